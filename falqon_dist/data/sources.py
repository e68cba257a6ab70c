"""Read alpaca / oasst1 / jsonl / chat / text sources into normalized train and eval records.

Local files (``.jsonl``, ``.json`` — JSON lines or one JSON array — and ``.parquet``; ``.txt`` for
``text``, one document per file) are checked here first, so a broken JSON line is reported with its
file and 1-based line number, then loaded with ``datasets.load_dataset("json" | "parquet", ...)``.
A directory written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``) is loaded
with ``load_from_disk``: its ``train`` split trains, its ``validation``/``test``/``eval`` split (if
any) evaluates. Any other directory is read as all data files below it; when some file names
contain ``train`` and others ``valid``/``eval``/``test``/``dev`` they are the two splits, otherwise
all rows form one pool split by ``eval_fraction``. For alpaca / oasst1, a ``path`` that does not
exist and is a hub id by :mod:`falqon_dist.hub_names`' rule (``owner/name``, no data file suffix,
its first component not a local directory) is loaded from the Hugging Face hub (network only); any
other missing path is an error naming it, never a hub request. A list of paths is read source
by source (each split on its own): the training records are concatenated, the eval records
interleaved (so the evaluated prefix covers every source). ``data=mix`` reads each of its ``sources``
this way and mixes them by weight (:mod:`falqon_dist.data.mixing`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from falqon_dist.data.config import DEFAULT_HUB_NAMES, DataConfig, DataSource, source_names
from falqon_dist.data.formats import (
    DataFormatError,
    Record,
    normalize_alpaca,
    normalize_chat,
    normalize_generic,
    normalize_text,
    oasst_conversations,
)
from falqon_dist.data.mixing import MixShare, interleave, mix
from falqon_dist.hub_names import hub_id_problem, local_reason

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
_SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")
_EVAL_WORDS = ("valid", "eval", "test", "dev")

Rows = tuple[Sequence[Mapping[str, Any]], list[str]]  # rows and where each one is ("file: line 3")


@contextmanager
def _quiet_datasets():
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _parse_json(path: Path) -> Rows:
    """Parse a .json/.jsonl file ourselves, so errors name the line; return rows and their locations."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        for i, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise DataFormatError(
                    f"{path}: row {i}: expected a JSON object, got {type(row).__name__}"
                )
        return rows, [f"{path}: row {i}" for i in range(1, len(rows) + 1)]
    rows, wheres = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"{path}: line {lineno}: invalid JSON ({err.msg}); expected one object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataFormatError(
                f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}"
            )
        rows.append(row)
        wheres.append(f"{path}: line {lineno}")
    return rows, wheres


_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


def split_text(text: str, sample_by: str, where: str) -> Rows:
    """The documents of one .txt file's ``text`` and their locations, by ``sample_by``: the whole
    file, each blank-line separated paragraph, or each non-blank line (blank ones carry no token)."""
    if sample_by == "document":
        return ([{"text": text}], [where]) if text.strip() else ([], [])
    rows: list[Mapping[str, Any]] = []
    wheres: list[str] = []
    if sample_by == "line":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                rows.append({"text": line})
                wheres.append(f"{where}: line {lineno}")
        return rows, wheres
    blocks = [block.strip("\n") for block in _PARAGRAPH_BREAK.split(text)]
    for number, block in enumerate((b for b in blocks if b.strip()), start=1):
        rows.append({"text": block})
        wheres.append(f"{where}: paragraph {number}")
    return rows, wheres


def read_file(
    path: Path, check: Callable[[Rows], object] | None = None, sample_by: str = "document"
) -> Rows:
    """Rows of one local file and their locations (file + line for jsonl, file + row otherwise).

    ``check`` (a normalizer) first runs on our own parse of a JSON file, so a malformed row is
    reported with its line before ``datasets`` sees the file. A .txt file gives its documents by
    ``sample_by`` (:func:`split_text`).
    """
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    if path.suffix not in FILE_SUFFIXES:
        raise DataFormatError(
            f"{path}: unsupported file type {path.suffix!r}; expected one of {FILE_SUFFIXES}"
        )
    if path.suffix == ".txt":
        return split_text(path.read_text(encoding="utf-8"), sample_by, str(path))
    builder, wheres = "parquet", None
    if path.suffix != ".parquet":
        parsed = _parse_json(path)
        if not parsed[0]:
            return [], []
        if check is not None:
            check(parsed)
        builder, wheres = "json", parsed[1]
    with _quiet_datasets() as datasets:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    if wheres is None:
        wheres = [f"{path}: row {i}" for i in range(1, len(dataset) + 1)]
    if len(wheres) != len(dataset):
        raise DataFormatError(
            f"{path}: read {len(dataset)} rows but found {len(wheres)} JSON objects"
        )
    return dataset, wheres


def _concat(parts: Sequence[Rows]) -> Rows:
    rows: list[Mapping[str, Any]] = []
    wheres: list[str] = []
    for part_rows, part_wheres in parts:
        rows.extend(part_rows)
        wheres.extend(part_wheres)
    return rows, wheres


def read_local(
    path: Path, check: Callable[[Rows], object] | None = None, sample_by: str = "document"
) -> tuple[Rows, Rows | None]:
    """``(train_or_pool, eval_or_None)`` rows of a local file or directory (``check``,
    ``sample_by``: see read_file)."""

    def read(file: Path) -> Rows:
        return read_file(file, check, sample_by)

    if path.is_file():
        return read(path), None
    if any((path / name).is_file() for name in _SAVED_DATASET_FILES):
        return read_saved(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
    if not files:
        raise FileNotFoundError(
            f"no {'/'.join(FILE_SUFFIXES)} files under dataset directory {path}"
        )
    train = [f for f in files if "train" in f.name.lower()]
    evals = [f for f in files if any(word in f.name.lower() for word in _EVAL_WORDS)]
    if train and evals:
        return _concat([read(f) for f in train]), _concat([read(f) for f in evals])
    return _concat([read(f) for f in files]), None


def read_saved(path: Path) -> tuple[Rows, Rows | None]:
    """``(train, eval_or_None)`` rows of a ``save_to_disk`` directory (a Dataset or a DatasetDict)."""
    with _quiet_datasets() as datasets:
        try:
            saved = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - a damaged or foreign directory: name it
            raise DataFormatError(
                f"{path}: looks like a `datasets` save_to_disk directory but cannot be loaded "
                f"({type(err).__name__}: {err})"
            ) from None

    def rows(dataset, split: str | None) -> Rows:
        label = f"{path} [{split}]" if split else str(path)
        return dataset, [f"{label}: row {i}" for i in range(1, len(dataset) + 1)]

    if not isinstance(saved, datasets.DatasetDict):
        return rows(saved, None), None
    splits = list(saved)
    train = "train" if "train" in saved else splits[0] if len(splits) == 1 else None
    if train is None:
        raise DataFormatError(f"{path}: a DatasetDict without a 'train' split (it has {splits})")
    eval_split = next((s for s in ("validation", "test", "eval") if s in saved), None)
    return rows(saved[train], train), (rows(saved[eval_split], eval_split) if eval_split else None)


def read_hub(name: str) -> tuple[Rows, Rows | None]:
    """``(train, eval_or_None)`` rows of a hub dataset (needs network)."""
    try:
        with _quiet_datasets() as datasets:
            splits = datasets.load_dataset(name)
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot reach the dataset"
        raise FileNotFoundError(
            f"{name!r} is not a local file or directory, and loading it from the Hugging Face hub failed "
            f"({type(err).__name__}: {err}); pass a local path (no network here?)"
        ) from err

    def rows(split: str) -> Rows:
        return splits[split], [
            f"hub dataset {name} [{split}]: row {i}" for i in range(1, len(splits[split]) + 1)
        ]

    eval_split = next((s for s in ("validation", "test") if s in splits), None)
    return rows("train"), (rows(eval_split) if eval_split else None)


_ROW_NORMALIZERS = {
    "alpaca": normalize_alpaca,
    "jsonl": normalize_generic,
    "chat": normalize_chat,
    "text": normalize_text,
}


def _normalizer(cfg: DataConfig) -> Callable[[Rows], list[Record]]:
    if cfg.name == "oasst1":
        return lambda rows: oasst_conversations(rows[0], rows[1], lang=cfg.lang)
    normalize = _ROW_NORMALIZERS[cfg.name]
    return lambda rows: [normalize(row, where) for row, where in zip(rows[0], rows[1], strict=True)]


@dataclasses.dataclass(frozen=True)
class Mixture:
    """The records of a ``data=mix`` config and what each source gave."""

    train: list[Record]
    #: Each source's eval records (the run evaluates them interleaved: :attr:`eval`).
    eval_parts: tuple[list[Record], ...]
    shares: tuple[MixShare, ...]

    @property
    def eval(self) -> list[Record]:
        return interleave(self.eval_parts)


def source_config(cfg: DataConfig, source: DataSource) -> DataConfig:
    """``cfg`` read as the single dataset ``source`` (its format and path; every other field kept)."""
    sample_by = cfg.sample_by if source.format == "text" else "document"
    return dataclasses.replace(
        cfg, name=source.format, path=source.path, sources=(), sample_by=sample_by
    )


def load_mixture(cfg: DataConfig) -> Mixture:
    """Each source of a ``mix`` config read on its own (its split, ``max_records``), then mixed."""
    parts = [load_records(source_config(cfg, source)) for source in cfg.sources]
    for name, source, (_, evals) in zip(source_names(cfg.sources), cfg.sources, parts, strict=True):
        if not evals:  # text by document, too few documents: data=text alone would take windows
            raise DataFormatError(
                f"data.sources ({name}: {source.path}): too few text documents to hold out "
                f"eval_fraction={cfg.eval_fraction} of them in a mixture; set data.sample_by="
                "paragraph or line, or train on it alone with data=text (eval windows)"
            )
    train, taken = mix(
        [part[0] for part in parts], [source.weight for source in cfg.sources], cfg.seed
    )
    shares = tuple(
        MixShare(
            name=name,
            label=source.path if isinstance(source.path, str) else ",".join(source.path),
            format=source.format,
            weight=source.weight,
            available=len(part[0]),
            taken=count,
            eval_records=len(part[1]),
        )
        for name, source, part, count in zip(
            source_names(cfg.sources), cfg.sources, parts, taken, strict=True
        )
    )
    return Mixture(train=train, eval_parts=tuple(part[1] for part in parts), shares=shares)


def load_records(cfg: DataConfig) -> tuple[list[Record], list[Record]]:
    """Normalized ``(train, eval)`` records of a file or hub dataset, or of several (not ``synthetic``).

    Each source is split on its own (``eval_fraction`` of its records, unless it has an eval split).
    ``text`` read by document with fewer than 1/eval_fraction documents in all (one corpus file)
    returns every document for training and no eval record: its eval set is a share of the
    tokenized windows, held out by :func:`falqon_dist.data.build_data` (:func:`takes_eval_windows`).
    """
    if cfg.name == "mix":
        mixture = load_mixture(cfg)
        return mixture.train, mixture.eval
    if isinstance(cfg.path, tuple):
        sources: tuple[str, ...] = cfg.path
    else:
        path = cfg.path or DEFAULT_HUB_NAMES.get(cfg.name)
        if path is None:
            raise ValueError(f"DataConfig.path is required for name={cfg.name!r}")
        sources = (path,)
    read = [_read_source(cfg, source) for source in sources]
    pool = [record for records, _ in read for record in records]
    if takes_eval_windows(cfg, len(pool)) and all(evals is None for _, evals in read):
        train = pool[: cfg.max_records] if cfg.max_records is not None else pool
        if not train:
            raise DataFormatError(f"{', '.join(sources)}: no usable records (no text)")
        return train, []
    parts = [
        (records, evals)
        if evals is not None
        else split_records(records, cfg.eval_fraction, cfg.seed, where=source + _split_hint(cfg))
        for source, (records, evals) in zip(sources, read, strict=True)
    ]
    train = [record for part_train, _ in parts for record in part_train]
    # any prefix (train.eval_samples) has every source
    evals = interleave([part_evals for _, part_evals in parts])
    if cfg.max_records is not None:
        train, evals = train[: cfg.max_records], evals[: cfg.max_records]
    if not train or not evals:
        raise DataFormatError(
            f"{', '.join(sources)}: no usable records (train {len(train)}, eval {len(evals)})"
        )
    return train, evals


def takes_eval_windows(cfg: DataConfig, num_documents: int) -> bool:
    """Whether ``text`` data of ``num_documents`` documents (none with an eval split) takes its eval
    set from the tokenized windows: read by document, and too few documents for ``eval_fraction``
    of them to be at least one."""
    return (
        cfg.name == "text" and cfg.sample_by == "document" and num_documents * cfg.eval_fraction < 1
    )


def _split_hint(cfg: DataConfig) -> str:
    if cfg.name == "text" and cfg.sample_by == "document":
        return " (text read by document: data.sample_by=paragraph or line reads more records)"
    return ""


def _read_source(cfg: DataConfig, source: str) -> tuple[list[Record], list[Record] | None]:
    """Normalized ``(records, eval_or_None)`` of one path or hub name (None: no eval split given)."""
    local = Path(source).expanduser()
    normalize = _normalizer(cfg)
    if local.exists():
        train_rows, eval_rows = read_local(local, normalize, cfg.sample_by)
    elif is_hub_dataset(cfg.name, source):
        train_rows, eval_rows = read_hub(source)
    else:
        reason = local_reason(source)
        raise FileNotFoundError(
            f"dataset path not found: {local}" + (f" (a local path, as {reason})" if reason else "")
        )
    return normalize(train_rows), None if eval_rows is None else normalize(eval_rows)


def is_hub_dataset(name: str, source: str) -> bool:
    """Whether data ``name`` reads the missing local path ``source`` from the Hugging Face hub: only
    alpaca / oasst1, only a hub id (:mod:`falqon_dist.hub_names`) without a data file suffix."""
    return (
        name in DEFAULT_HUB_NAMES
        and local_reason(source) is None
        and not source.endswith(FILE_SUFFIXES)
        and source.count("/") == 1
        and hub_id_problem(source) is None
    )


def split_records(
    records: list[Record], eval_fraction: float, seed: int, *, where: str = "dataset"
) -> tuple[list[Record], list[Record]]:
    """Seeded random ``(train, eval)`` split with ``round(n · eval_fraction)`` (at least 1) eval records."""
    if len(records) < 2:
        raise DataFormatError(
            f"{where}: need at least 2 records to split off an eval set, got {len(records)}"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    num_eval = min(max(1, round(len(records) * eval_fraction)), len(records) - 1)
    eval_ids = set(order[:num_eval])
    train = [r for i, r in enumerate(records) if i not in eval_ids]
    evals = [records[i] for i in sorted(eval_ids)]
    return train, evals
