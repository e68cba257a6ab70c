"""Exact, crash-safe checkpoints through ``engine.save_checkpoint`` / ``engine.load_checkpoint``.

DeepSpeed saves the module (FP8 ``qweight`` bytes, fp32 ``scale`` buffers, B), the optimizer state
(fp32 masters and Adam moments, per-rank partitions under ZeRO) and its step counters. We add:

* every rank's RNG state (torch, Python, NumPy), so a resumed run draws the same random numbers;
* ``client_state`` (e.g. the trainer's data position);
* a crash-safe ``latest`` pointer: each checkpoint goes to its own ``step_N`` directory and only when
  every rank has finished writing does rank 0 atomically replace ``latest``. A crash mid-save leaves
  ``latest`` naming the previous, complete checkpoint;
* a full disk is found before the save starts: every rank checks the free space of ``ckpt_dir``
  against the expected size (the last checkpoint's, or the caller's estimate for the first) and all
  agree on the smallest (one all-gather), so the run stops with :class:`CheckpointSpaceError` on every rank instead
  of half-writing. A write that still fails (``ENOSPC`` mid-save, an I/O error) raises
  :class:`CheckpointWriteError` on that rank, after removing the incomplete directory it wrote into;
  that rank then exits without another collective (its peers may be inside DeepSpeed's own
  barriers) and the launcher ends the job.

This module owns the format: it also reads a checkpoint back without an engine, in one process,
whatever world size and ZeRO stage wrote it (:func:`resolve_tag`, :func:`consolidated_state_dict`):

* ZeRO-0/1/2: rank 0's ``mp_rank_00_model_states.pt`` holds the whole module state dict in the
  module's own dtypes (``qweight`` uint8, ``scale`` fp32, the rest in the run's dtype).
* ZeRO-3: every rank's ``zero_pp_rank_R_mp_rank_00_model_states.pt`` holds its slice of each frozen
  parameter in its own dtype (``frozen_param_fragments``: the uint8 FP8 codes stay uint8) and the
  buffers; the fp32 masters of the trainable proxies B are in the optimizer-state files. DeepSpeed's
  public ``get_fp32_state_dict_from_zero_checkpoint`` concatenates the slices (no cast of frozen
  parameters; buffers are read as fp32, which the scales already are) for any saved world size.
"""

from __future__ import annotations

import contextlib
import errno
import io
import random
import re
import shutil
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
import torch.distributed as tdist

from falqon_dist.distributed.safe_load import (
    NUMPY_ARRAY,
    load_file,
    use_safe_loads,
    weights_only_loads,
)
from falqon_dist.distributed.waits import barrier
from falqon_dist.files import write_atomic

LATEST = "latest"
TAG_PATTERN = re.compile(r"^step_(\d+)$")
#: Model-state file of ZeRO-0/1/2 checkpoints (rank 0 writes the whole module).
REPLICATED_STATES = "mp_rank_00_model_states.pt"
#: Model-state files of ZeRO-3 checkpoints (one per rank: that rank's slices of frozen parameters).
PARTITIONED_STATES = "zero_pp_rank_*_mp_rank_00_model_states.pt"
#: Free space required beyond the expected size of a checkpoint (metadata, DeepSpeed's extra files).
SPACE_MARGIN = 1.10


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written; ``latest`` still names the last complete one."""


class CheckpointSpaceError(CheckpointError):
    """Not enough free space for the next checkpoint (found before anything was written)."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed on this rank (e.g. the disk filled up during the save)."""


class CheckpointReadError(CheckpointError):
    """A checkpoint that is not there or not in the format its run's config says; names the path."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rng_file(ckpt_dir: Path, tag: str, rank: int) -> Path:
    return ckpt_dir / tag / f"rng_rank{rank:05d}.pt"


def _rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


_T = TypeVar("_T")


def _from_rank0(value: _T) -> _T:
    """Rank 0's ``value`` (a flag or a short string) on every rank (its view of the checkpoint
    directory decides)."""
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)  # on the backend's device (NCCL needs CUDA tensors)
    return box[0]


def _atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (:func:`falqon_dist.files.write_atomic`: a fresh
    ``mkstemp`` file renamed over it; a symbolic link planted at ``path`` is refused, never followed)."""
    write_atomic(path, text)


def saved_world_size(ckpt_dir: str | Path, tag: str) -> int:
    """How many ranks wrote checkpoint ``tag`` (one RNG file each)."""
    return len(list((Path(ckpt_dir) / tag).glob("rng_rank*.pt")))


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag ``latest`` points to, or None when there is no complete checkpoint.

    ``latest`` must name a ``step_N`` directory directly inside ``ckpt_dir`` (no path, no link out of
    it): anything else raises :class:`CheckpointReadError` naming the pointer and what it holds,
    rather than loading from wherever it points."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.is_symlink() or (pointer.exists() and not pointer.is_file()):
        raise CheckpointReadError(
            f"{pointer} is not a regular file; falqon_dist writes it as one (holding a tag "
            "like step_00000100): remove it, or point train.resume at a run it wrote"
        )
    if not pointer.is_file():
        return None
    tag = pointer.read_text(errors="replace").strip()
    if not TAG_PATTERN.match(tag):
        raise CheckpointReadError(
            f"{pointer} holds {tag[:80]!r}, not a checkpoint tag (step_ and 8 digits, a "
            f"directory inside {ckpt_dir})"
        )
    directory = ckpt_dir / tag
    if directory.is_symlink():
        raise CheckpointReadError(
            f"{directory} is a symbolic link; a checkpoint is a directory inside {ckpt_dir}"
        )
    return tag if directory.is_dir() else None


def checkpoint_bytes(ckpt_dir: str | Path, tag: str | None) -> int:
    """Bytes of checkpoint ``tag`` on disk (0 when there is none)."""
    if tag is None or not (Path(ckpt_dir) / tag).is_dir():
        return 0
    return sum(p.stat().st_size for p in (Path(ckpt_dir) / tag).rglob("*") if p.is_file())


def check_free_space(ckpt_dir: str | Path, tag: str, needed_bytes: int) -> int:
    """Raise :class:`CheckpointSpaceError` on every rank when any rank's ``ckpt_dir`` has less than
    ``needed_bytes`` × ``SPACE_MARGIN`` free (one all-gather of the free space); else return the
    least free space on any rank."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(ckpt_dir).free
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        every = [0] * tdist.get_world_size()
        tdist.all_gather_object(every, free)  # on the backend's device (NCCL needs CUDA tensors)
        free = min(every)
    wanted = needed_bytes * SPACE_MARGIN
    if free < wanted:
        last = latest_tag(ckpt_dir)
        raise CheckpointSpaceError(
            f"not enough space for checkpoint {tag} in {ckpt_dir}: it needs about {wanted / 2**20:,.0f} MiB, "
            f"{free / 2**20:,.0f} MiB are free (the least on any rank); nothing was written, the last "
            f"good checkpoint is {ckpt_dir / last if last else 'none'}; free space (or lower "
            f"train.keep_checkpoints) and resume with train.resume=true"
        )
    return free


def save(
    engine,
    ckpt_dir: str | Path,
    step: int,
    client_state: dict[str, Any] | None = None,
    keep: int = 0,
    *,
    expected_bytes: int = 0,
) -> str:
    """Save a complete checkpoint for ``step`` on every rank; returns its tag.

    ``keep`` > 0 deletes all but the newest ``keep`` complete checkpoints afterwards. Before writing,
    the free space is checked against the last checkpoint's size, or ``expected_bytes`` when there
    is none yet (:func:`check_free_space`).

    A save never skips silently and never writes into a complete checkpoint: when ``step``'s tag is
    already ``latest`` this raises :class:`CheckpointWriteError` (a caller that resumed from that very
    checkpoint and took no step has nothing to save, and must not call this). A ``step_N`` directory
    that is not ``latest`` is what a crashed save left: rank 0 removes it before anything is written.
    """
    ckpt_dir = Path(ckpt_dir)
    tag, rank = tag_for(step), _rank()
    last = latest_tag(ckpt_dir)
    found = "latest" if last == tag else "leftover" if (ckpt_dir / tag).exists() else "absent"
    found = _from_rank0(found)
    if found == "latest":
        raise CheckpointWriteError(
            f"checkpoint {ckpt_dir / tag} already exists and is the latest: not overwriting a complete "
            "checkpoint (a run writes each step once; was this directory used by another run?)"
        )
    if found == "leftover":
        if rank == 0:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        barrier(f"remove the incomplete checkpoint {tag} a crashed save left")
    needed = checkpoint_bytes(ckpt_dir, last) or expected_bytes
    free = check_free_space(ckpt_dir, tag, needed)
    rng = _rng_state()
    try:
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        torch.save(rng, _rng_file(ckpt_dir, tag, rank))
        engine.save_checkpoint(
            str(ckpt_dir), tag=tag, client_state=dict(client_state or {}), save_latest=False
        )
    except (OSError, RuntimeError) as error:  # torch.save wraps a failed write in a RuntimeError
        raise _write_failure(error, ckpt_dir, tag, "write", needed, free) from error
    barrier(f"finish writing checkpoint {tag}")
    if rank == 0:
        try:
            _atomic_write_text(ckpt_dir / LATEST, tag)
        except OSError as error:  # complete but not marked: as good as never written
            raise _write_failure(
                error, ckpt_dir, tag, "mark as the latest", needed, free
            ) from error
        if keep > 0:
            _prune(ckpt_dir, keep, current=tag)
    barrier(f"see rank 0 mark {tag} as the latest checkpoint")
    return tag


def _write_failure(
    error: Exception, ckpt_dir: Path, tag: str, action: str, needed: int, free: int
) -> CheckpointWriteError:
    """The error of a save that failed on this rank, after removing what it wrote of ``tag``.

    A full disk is told apart by the error (ENOSPC) or, as torch's zip writer reports only "file
    write failed", by less than 1 MiB left on ``ckpt_dir`` when the write failed."""
    full = (
        isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left" in str(error)
    )
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(ckpt_dir).free < 2**20
    # never left half-written, never marked latest
    shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    last = latest_tag(ckpt_dir)
    cause = (
        f"the disk filled up: about {needed * SPACE_MARGIN / 2**20:,.1f} MiB expected, "
        f"{free / 2**20:,.1f} MiB were free when the save began"
        if full
        else f"{type(error).__name__}: {error}"
    )
    return CheckpointWriteError(
        f"rank {_rank()} could not {action} checkpoint {tag} in {ckpt_dir} ({cause}); the incomplete directory was "
        f"removed and the last good checkpoint is {ckpt_dir / last if last else 'none'}"
    )


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
    for old in tags[:-keep]:
        if old != current:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    """This rank's RNG states as tensors and plain values (readable with ``weights_only=True``)."""
    name, keys, position, has_gauss, cached = cast(
        tuple[str, Any, int, int, float], np.random.get_state()
    )
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    numpy = rng["numpy"]
    if isinstance(numpy, dict):
        numpy = (
            numpy["name"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    np.random.set_state(numpy)  # a tuple holding an ndarray in RNG files of earlier versions
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load(engine, ckpt_dir: str | Path, tag: str | None = None) -> tuple[str, dict[str, Any]]:
    """Restore the checkpoint ``tag`` (default: ``latest``) on every rank; returns (tag, client_state).

    Every file is read with ``weights_only=True`` (:mod:`falqon_dist.distributed.safe_load`): a file
    that would need more raises :class:`~falqon_dist.distributed.safe_load.UnsafeCheckpointError`
    naming it, before any of it is used."""
    ckpt_dir = Path(ckpt_dir)
    tag = resolve_tag(ckpt_dir, tag)
    use_safe_loads(engine)
    with weights_only_loads(ckpt_dir / tag):
        load_path, client_state = engine.load_checkpoint(
            str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if load_path is None:
        raise CheckpointReadError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_file = _rng_file(ckpt_dir, tag, _rank())
    if rng_file.is_file():
        _set_rng_state(load_file(rng_file, extra=NUMPY_ARRAY))
    return tag, client_state or {}


# ------------------------------------------------------------------------------- reading, in one process
def resolve_tag(ckpt_dir: Path, tag: str | int | None = "latest") -> str:
    """``latest`` (the complete checkpoint ``checkpoints/latest`` names), ``step_00000300`` or ``300``."""
    if not ckpt_dir.is_dir():
        raise CheckpointReadError(f"{ckpt_dir} not found: the run saved no checkpoint")
    if tag is None or str(tag) == LATEST:
        found = latest_tag(ckpt_dir)
        if found is None:
            raise CheckpointReadError(f"{ckpt_dir / LATEST} does not name a complete checkpoint")
        return found
    text = str(tag)
    if text.isdigit():
        text = tag_for(int(text))
    if not TAG_PATTERN.match(text):
        raise CheckpointReadError(
            f"checkpoint tag {text[:80]!r} is not a tag: use 'latest', a step number or "
            "step_ and 8 digits (a directory inside checkpoints/)"
        )
    if not (ckpt_dir / text).is_dir() or (ckpt_dir / text).is_symlink():
        available = sorted(
            p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)
        )
        raise CheckpointReadError(
            f"checkpoint {ckpt_dir / text} not found; available tags: {available or 'none'}"
        )
    return text


def consolidated_state_dict(
    ckpt_dir: Path, tag: str, zero_stage: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """The full module state dict saved under ``ckpt_dir/tag`` by a run with ``zero_stage``, and the
    rest of rank 0's model-state file (client state such as ``step``; the module entry removed)."""
    directory = ckpt_dir / tag
    if zero_stage == 3:
        files = sorted(directory.glob(PARTITIONED_STATES))
        if not files:
            raise CheckpointReadError(
                f"{directory}: no {PARTITIONED_STATES} (the config says deepspeed.zero_stage=3)"
            )
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # it prints a report per file and tqdm bars: keep the CLI's output to its own summary
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            weights_only_loads(directory),
        ):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        meta_file = directory / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    else:
        meta_file = directory / REPLICATED_STATES
        if not meta_file.is_file():
            raise CheckpointReadError(
                f"{meta_file} not found (the config says deepspeed.zero_stage={zero_stage})"
            )
        state = None
    meta = load_file(meta_file)
    module_state = meta.pop("module")
    return (module_state if state is None else state), meta
