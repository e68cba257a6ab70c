"""Data configuration."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from falqon_dist.config_checks import (
    InvalidField,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_positive_int,
    is_int,
)
from falqon_dist.data.synthetic import FINETUNE_TASKS

DATASET_NAMES = ("synthetic", "alpaca", "oasst1", "jsonl", "chat", "text", "mix")
#: Datasets read only from local files (no default hub dataset).
LOCAL_ONLY = ("jsonl", "chat", "text")
#: Hub dataset used for ``alpaca`` / ``oasst1`` when ``path`` is None (needs network).
DEFAULT_HUB_NAMES = {"alpaca": "tatsu-lab/alpaca", "oasst1": "OpenAssistant/oasst1"}
#: How a .txt file of ``text`` data becomes documents (Hugging Face's ``text`` loader's ``sample_by``).
SAMPLE_BY = ("document", "paragraph", "line")
#: What one source of a ``mix`` can be: every file dataset.
SOURCE_FORMATS = ("alpaca", "oasst1", "jsonl", "chat", "text")
_SOURCE_KEYS = ("path", "format", "weight", "name")
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check_path(owner: str, field: str, path: Any) -> str | tuple[str, ...]:
    """A non-empty path string or a non-empty tuple of them (a list becomes a tuple)."""
    if isinstance(path, list):
        path = tuple(path)
    paths = path if isinstance(path, tuple) else (path,)
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise InvalidField(
            owner, field, "must be a non-empty string or a non-empty list of them", path
        )
    return path


@dataclass(frozen=True)
class DataSource:
    """One dataset of a ``data=mix`` mixture: where it is, how its rows read, and its share."""

    #: As :attr:`DataConfig.path` (a file, directory, save_to_disk directory or hub name, or a list).
    path: str | tuple[str, ...]
    #: How the rows read: one of :data:`SOURCE_FORMATS` (as ``DataConfig.name``).
    format: str
    #: Relative share of the mixture's training records (> 0): a source of weight 2 gives twice as
    #: many records as one of weight 1, whatever their sizes (sampled down, or repeated).
    weight: float = 1.0
    #: What its metrics are called (``eval_loss/<name>``): letters, digits, ``_.-``; None = the
    #: file or directory name without its suffix (the first path's, numbered when two coincide).
    name: str | None = None

    def __post_init__(self) -> None:
        owner = "DataSource"
        object.__setattr__(self, "path", _check_path(owner, "path", self.path))
        check_choice(owner, "format", self.format, SOURCE_FORMATS)
        check_number(owner, "weight", self.weight, 0.0, low_open=True)
        if self.name is not None and (
            not isinstance(self.name, str) or not _SOURCE_NAME.match(self.name)
        ):
            raise InvalidField(
                owner, "name", "must be null or letters, digits and _.- (e.g. chat_en)", self.name
            )

    @property
    def default_name(self) -> str:
        first = self.path if isinstance(self.path, str) else self.path[0]
        stem = Path(first.rstrip("/")).stem or "source"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)


def source_names(sources: tuple[DataSource, ...]) -> tuple[str, ...]:
    """Each source's metric name: its own ``name``, else its default, numbered (``_<i>``) where
    defaults coincide with each other or with a given name."""
    given = [source.name for source in sources if source.name is not None]
    defaults = Counter(source.default_name for source in sources if source.name is None)
    return tuple(
        source.name
        if source.name is not None
        else source.default_name
        if defaults[source.default_name] == 1 and source.default_name not in given
        else f"{source.default_name}_{index}"
        for index, source in enumerate(sources)
    )


def _source(index: int, item: Any) -> DataSource:
    """``item`` (a DataSource or a mapping from the config) as a DataSource, errors naming ``sources[i]``."""
    field = f"sources[{index}]"
    if isinstance(item, DataSource):
        return item
    if not isinstance(item, Mapping):
        raise InvalidField(
            "DataConfig", field, "must be a mapping {path, format, weight, name}", item
        )
    unknown = sorted(set(item) - set(_SOURCE_KEYS))
    if unknown:
        raise InvalidField(
            "DataConfig",
            field,
            f"has unknown key(s) {unknown}; a source has {_SOURCE_KEYS}",
            dict(item),
        )
    for key in ("path", "format"):
        if key not in item:
            raise InvalidField(
                "DataConfig", field, f"needs {key!r} (a source has {_SOURCE_KEYS})", dict(item)
            )
    try:
        return DataSource(**item)
    except InvalidField as exc:
        raise InvalidField(
            "DataConfig", f"{field}.{exc.field}", exc.requirement, exc.value
        ) from None


@dataclass(frozen=True)
class DataConfig:
    """Which dataset to fine-tune on and how to turn it into batches.

    Every field is validated on construction; a bad value raises
    :class:`~falqon_dist.config_checks.InvalidField` (a ``ValueError``) naming the field and what
    would be valid.
    """

    #: Dataset: "synthetic" (built-in held-out task, no files needed) | "alpaca" | "oasst1" |
    #: "jsonl" (rows {"prompt", "response"} or Alpaca fields) | "chat" (rows {"messages"} or
    #: ShareGPT {"conversations"}, rendered with the tokenizer's chat template) | "text" (rows
    #: {"text"} or .txt files, every token trained) | "mix" (several of those, weighted: ``sources``).
    name: str = "synthetic"
    #: Local file (.jsonl / .json / .parquet, .txt for text), directory of them, or a `datasets`
    #: save_to_disk directory; or a list of those (read one by one, concatenated). For alpaca /
    #: oasst1 a hub dataset name is also accepted (network only); None = the default hub dataset.
    #: Must be None for synthetic and mix.
    path: str | tuple[str, ...] | None = None
    #: mix only (and required there): the datasets mixed, each a :class:`DataSource` (or a mapping
    #: ``{path, format, weight}``). Their training records are sampled in proportion to the weights,
    #: as many in all as the sources hold together; their eval records are interleaved.
    sources: tuple[DataSource, ...] = ()
    #: Synthetic only: the held-out fine-tuning task, one of synthetic.FINETUNE_TASKS.
    task: str = "shift"
    #: Tokens per example (prompt + response + EOS) and per packed row (the run's model.max_length;
    #: None only until the trainer has read the model's own context).
    max_length: int | None = 128
    #: True: pack several examples into rows of max_length (labels masked per example). False:
    #: one example per row, batches grouped by length.
    packing: bool = False
    #: Instruction formats (alpaca, jsonl, oasst1, chat): also train on the prompt / non-assistant
    #: tokens (False: the loss covers only responses and assistant turns).
    train_on_inputs: bool = False
    #: Synthetic only: number of train / eval records (the splits never share a prompt).
    num_train: int = 2000
    num_eval: int = 200
    #: Share of records held out for eval when a file dataset has no split of its own, in (0, 1).
    #: ``text`` read by document with fewer than 1/eval_fraction documents (one corpus file): the
    #: share of its max_length windows, held out before packing (eval windows never train).
    eval_fraction: float = 0.05
    #: ``text`` (and the text sources of ``mix``): what one document of a .txt file is — "document"
    #: (the whole file), "paragraph" (blank-line separated blocks) or "line" (every non-blank line,
    #: as Hugging Face's ``text`` loader). Rows of JSON / parquet files are documents as they are.
    sample_by: str = "document"
    #: File / hub datasets: keep at most this many records per split (of each source for mix,
    #: before mixing; None keeps all).
    max_records: int | None = None
    #: oasst1 only: keep pairs whose prompt has this language code (e.g. "en"); None keeps all.
    lang: str | None = None
    #: Seed of synthetic generation, of the eval split and of the batch order.
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "DataConfig"
        check_choice(owner, "name", self.name, DATASET_NAMES)
        if self.path is not None:
            object.__setattr__(self, "path", _check_path(owner, "path", self.path))
        if self.name in ("synthetic", "mix") and self.path is not None:
            raise InvalidField(
                owner,
                "path",
                f"must be None for name={self.name!r}"
                + (" (each source has its own path)" if self.name == "mix" else ""),
                self.path,
            )
        if not isinstance(self.sources, (list, tuple)):
            raise InvalidField(
                owner, "sources", "must be a list of {path, format, weight}", self.sources
            )
        object.__setattr__(
            self, "sources", tuple(_source(i, item) for i, item in enumerate(self.sources))
        )
        names = [source.name for source in self.sources if source.name is not None]
        if len(set(names)) != len(names):
            raise InvalidField(
                owner,
                "sources",
                "hold the same name twice; each source's name must be its own",
                names,
            )
        if self.name == "mix" and not self.sources:
            raise InvalidField(
                owner,
                "sources",
                "is required for name='mix': a list of {path, format, weight}",
                list(self.sources),
            )
        if self.name != "mix" and self.sources:
            raise InvalidField(
                owner,
                "sources",
                f"is only read by name='mix' (this is {self.name!r}); "
                "use name='mix' to mix several datasets",
                list(self.sources),
            )
        if self.name in LOCAL_ONLY and self.path is None:
            raise InvalidField(
                owner,
                "path",
                f"is required for name={self.name!r} (a local file or directory)",
                self.path,
            )
        check_choice(owner, "task", self.task, FINETUNE_TASKS)
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length < 8):
            raise InvalidField(owner, "max_length", "must be an integer >= 8", self.max_length)
        check_bool(owner, "packing", self.packing)
        check_bool(owner, "train_on_inputs", self.train_on_inputs)
        check_positive_int(owner, "num_train", self.num_train)
        check_positive_int(owner, "num_eval", self.num_eval)
        check_number(
            owner, "eval_fraction", self.eval_fraction, 0.0, 1.0, low_open=True, high_open=True
        )
        check_choice(owner, "sample_by", self.sample_by, SAMPLE_BY)
        if self.sample_by != "document" and self.name not in ("text", "mix"):
            raise InvalidField(
                owner,
                "sample_by",
                f"is read only by name='text' (and the text sources of 'mix'), not {self.name!r}; "
                "leave it at 'document'",
                self.sample_by,
            )
        if self.max_records is not None:
            check_positive_int(owner, "max_records", self.max_records)
        if self.lang is not None and (not isinstance(self.lang, str) or not self.lang):
            raise InvalidField(
                owner, "lang", "must be None or a language code such as 'en'", self.lang
            )
        check_int(owner, "seed", self.seed)
