"""One run per run directory, and what a resume may change — both decided before anything is written.

**The lock.** Rank 0 holds an exclusive ``flock`` on ``run.dir/.lock`` for the whole run and writes
its holder (host, pid, start time) into it. A second run on the same directory fails at once naming
that holder. ``flock`` is released by the kernel when its process dies, so a lock file left by a
killed run is simply taken over (with a line naming the run that left it).

**Resume.** ``train.resume=true`` compares the new config with the run's saved ``config.yaml``
before the checkpoint, the data or the model is touched, and before ``config.yaml`` is rewritten:

* keys that change what the checkpoint *is* (method, model, data, ZeRO stage, precision, seed,
  batch shape; and the number of ranks that wrote it) must be equal: otherwise one error lists
  every differing key with its saved and new value, and nothing in the run directory changes;
* keys of cadence, logging and the schedule may change, each with a warning (a new ``max_steps``
  or ``lr`` changes the learning-rate schedule from the resumed step on).

**A fresh run never lands on an old one.** ``train.resume=false`` into a directory that already holds
a run's outputs (:data:`RUN_OUTPUTS`: its config.yaml, checkpoints, metrics, log, ...) used to
overwrite its config.yaml, interleave both runs in metrics.jsonl and skip the final save (its tag
equals the old ``latest``). :func:`check_run_dir_use` refuses that before any work, naming both ways
out: ``train.resume=true`` (continue it) or ``run.overwrite=true``, which moves the old run's outputs
into the sibling directory ``<run.dir>.old-<time>`` (said in one line; nothing is deleted). An empty
directory, or one holding only a lock left by a finished or killed run, is a fresh start. Files of
other names (a hostfile, data kept beside the run) are neither counted nor moved.

**Regular files only.** Every file of the run directory is opened with ``O_NOFOLLOW`` or replaced
atomically (:mod:`falqon_dist.files`); :func:`check_run_dir_use` also refuses up front a symbolic
link (or a FIFO, or a hard-linked log) at one of the names a run writes (:data:`RUN_FILES`), naming it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import itertools
import logging
import os
import socket
from pathlib import Path
from typing import Any, cast

import torch.distributed as tdist
from omegaconf import DictConfig, OmegaConf

from falqon_dist.distributed.waits import announced
from falqon_dist.files import UnsafeFileError, check_plain_file, open_no_follow
from falqon_dist.train.config_errors import ConfigError
from falqon_dist.train.config_migrations import move_keys
from falqon_dist.train.logging_utils import note_before_logging

log = logging.getLogger("falqon_dist")

LOCK_NAME = ".lock"

#: What a run writes into its run directory besides the lock: a directory holding any of these (or
#: an ``error_rank<R>.txt``) holds a run, which a fresh run must not write into.
RUN_OUTPUTS = (
    "config.yaml",
    "metrics.jsonl",
    "train.log",
    "checkpoints",
    "export",
    "tensorboard",
    "wandb",
    "wandb_run_id",
)
#: A rank's traceback of a failed run (``falqon_dist.train.trainer.report_crash``).
ERROR_FILES = "error_rank*.txt"
#: The files a run writes directly in its run directory, and whether each is written in place
#: (appended or locked: a hard link would be written through) rather than replaced whole.
RUN_FILES = {
    LOCK_NAME: True,
    "train.log": True,
    "metrics.jsonl": True,
    "config.yaml": False,
    "wandb_run_id": False,
}

#: Keys a resume may change (a key equal to an entry or below it), and which of them re-shape the schedule.
RESUME_MAY_CHANGE = (
    "run.dir",
    "train.max_steps",
    "train.epochs",
    "train.lr",
    "train.warmup_steps",
    "train.warmup_ratio",
    "train.schedule",
    "train.min_lr_ratio",
    "train.save_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.eval_samples",
    "train.eval_generate_samples",
    "train.resume",
    "train.log_every",
    "train.max_nonfinite_steps",
    "train.saturation_warn",
    "train.saturation_abort",
    "logger",
    "wandb",
    "export",
    "dist",
    "fp8.cast",
    "run.overwrite",
)
SCHEDULE_KEYS = (
    "train.max_steps",
    "train.epochs",
    "train.lr",
    "train.warmup_steps",
    "train.warmup_ratio",
    "train.schedule",
    "train.min_lr_ratio",
)


class RunDirBusy(RuntimeError):
    """Another live run holds this run directory."""


class RunDirLock:
    """The exclusive lock of one run directory, held until :meth:`release` or process exit."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_NAME
        try:
            # a link at .lock must not lock (and empty) its target
            self._handle = open_no_follow(self.path, "a+")
        except UnsafeFileError as error:
            raise ConfigError(str(error)) from None
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "unknown"
            self._handle.close()
            raise _busy(run_dir, holder) from None
        self._handle.seek(0)
        previous = self._handle.read().strip()
        if previous:
            log.warning(
                "run.dir %s: taking over the lock left by a run that no longer exists (%s)",
                run_dir,
                previous,
            )
        self._handle.seek(0)
        self._handle.truncate()
        since = dt.datetime.now().isoformat(timespec="seconds")
        self._handle.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {since}\n")
        self._handle.flush()

    def release(self) -> None:
        """Empty the lock file (nobody to take over from) and unlock it; a second call does nothing."""
        if self._handle.closed:
            return
        self._handle.seek(0)
        self._handle.truncate()  # an empty lock file: nobody to take over from
        self._handle.flush()
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


def _busy(run_dir: Path, holder: str) -> RunDirBusy:
    return RunDirBusy(
        f"run.dir {run_dir} is in use by another run ({holder}); wait for it to finish, or choose "
        "another run.dir"
    )


def _live_holder(run_dir: Path) -> str | None:
    """Who holds ``run_dir``'s lock (its text), if a live run does; None if nobody. Only looks:
    a missing lock file is not created, a free one is neither taken nor changed."""
    try:
        handle = open_no_follow(run_dir / LOCK_NAME, "r")
    except FileNotFoundError:
        return None
    with handle:
        try:
            # conflicts with a live run's exclusive lock
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "unknown"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def previous_run(run_dir: Path) -> list[str]:
    """The names of a run's outputs (:data:`RUN_OUTPUTS`, ``error_rank*.txt``) in ``run_dir``, sorted;
    empty for a missing or fresh directory. A dangling symbolic link at such a name counts too."""
    if not run_dir.is_dir():
        return []
    names = [name for name in RUN_OUTPUTS if os.path.lexists(run_dir / name)]
    return sorted([*names, *(path.name for path in run_dir.glob(ERROR_FILES))])


def _check_run_files(run_dir: Path) -> None:
    """ConfigError naming the first name a run writes (:data:`RUN_FILES`, ``error_rank*.txt``) that
    is not a plain regular file in ``run_dir``."""
    names = {**RUN_FILES, **{path.name: False for path in sorted(run_dir.glob(ERROR_FILES))}}
    for name, in_place in names.items():
        try:
            check_plain_file(run_dir / name, in_place=in_place)
        except UnsafeFileError as error:
            raise ConfigError(str(error)) from None


def _aside_dir(run_dir: Path) -> Path:
    """A new, empty ``<run.dir>.old-<time>[-N]`` beside the directory ``run_dir`` resolves to (the
    same file system as its contents, so moving them is a rename; a symlinked run.dir keeps its link)."""
    real = run_dir.resolve()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in itertools.count():
        aside = real.parent / (f"{real.name}.old-{stamp}" + (f"-{n}" if n else ""))
        try:
            aside.mkdir()
            return aside
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def move_previous_run(run_dir: Path, names: list[str]) -> Path:
    """Rename ``names`` (a previous run's outputs) from ``run_dir`` into a new :func:`_aside_dir`;
    return it. Nothing is copied or deleted. ConfigError naming what was moved and what was not if a
    rename fails (a run.dir that is a mount point cannot rename into its parent)."""
    real = run_dir.resolve()
    aside = _aside_dir(run_dir)
    moved: list[str] = []
    for name in names:
        try:
            os.rename(real / name, aside / name)
        except OSError as error:
            if not moved:
                aside.rmdir()
            done = f"moved {', '.join(moved)} to {aside}, not " if moved else "moved nothing; "
            raise ConfigError(
                f"run.overwrite=true: cannot move {real / name} to {aside} ({error.strerror}); {done}"
                f"{', '.join(names[len(moved) :])}: move or remove the previous run in {run_dir} yourself"
            ) from None
        moved.append(name)
    return aside


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> str | None:
    """What a run may find in ``run_dir`` before it writes anything (rank 0): RunDirBusy if a live
    run holds it; ConfigError for a symbolic link at one of our file names, or for a fresh run
    (``resume=false``) into a directory holding a run, unless ``overwrite``, which moves that run
    aside. Returns the line saying where it went (None: nothing moved). Changes nothing otherwise.
    (``resume`` with ``overwrite`` is refused by :func:`~falqon_dist.train.settings.validate`.)"""
    if not run_dir.is_dir():
        return None
    _check_run_files(run_dir)
    holder = _live_holder(run_dir)
    if holder is not None:
        raise _busy(run_dir, holder)
    names = previous_run(run_dir)
    if resume or not names:
        return None
    if not overwrite:
        raise ConfigError(
            f"run.dir {run_dir} already holds a run ({', '.join(names)}): a fresh run would overwrite its "
            f"config.yaml and mix into its metrics and checkpoints. Continue it with train.resume=true, start "
            f"over with run.overwrite=true (moves it to {run_dir.resolve()}.old-<time>), or choose another run.dir"
        )
    aside = move_previous_run(run_dir, names)
    return (
        f"run.overwrite=true: moved the previous run in {run_dir} ({', '.join(names)}) to {aside}"
    )


def check_run_dir_use(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """:func:`prepare_run_dir` on rank 0, before any rank looks at or writes into ``run_dir``; every
    rank gets its verdict (one broadcast) and raises the same error, which rank 0 alone reports. The
    line naming where ``run.overwrite=true`` moved the old run goes to stderr at once (the old run's
    place must be said even if this run fails next) and into the new train.log."""
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    verdict: list[str | None] = [None, None]  # [error kind, message]
    if rank == 0:
        try:
            moved = prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
        except (RunDirBusy, ConfigError) as error:
            verdict = [type(error).__name__, str(error)]
        except OSError as error:  # a directory we cannot read: said once, by every rank
            verdict = ["ConfigError", f"run.dir {run_dir}: cannot be checked ({error})"]
        else:
            if moved is not None:
                note_before_logging(moved)
    if world > 1:
        with announced(
            "rank 0 to check the run directory (a fresh run into a used one is refused)"
        ):
            tdist.broadcast_object_list(verdict, src=0)
    kind, message = verdict
    if kind is not None:
        raise (RunDirBusy if kind == "RunDirBusy" else ConfigError)(message)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b.c": leaf}`` (a config's dotted keys)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _may_change(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUME_MAY_CHANGE)


def check_resume(
    run_dir: Path, cfg: DictConfig, world_size: int, saved_world_size: int | None
) -> list[str]:
    """Raise :class:`ConfigError` if resuming ``run_dir`` with ``cfg`` cannot work; return warnings.

    ``saved_world_size``: the ranks that wrote the latest checkpoint (None: no checkpoint yet, in which
    case nothing is compared: the run starts from step 0).
    """
    saved_path = run_dir / "config.yaml"
    if saved_world_size is None or not saved_path.is_file():
        return []
    from falqon_dist.train.saved_config import RestoreError, read_saved_config

    try:  # never resolved: a `${oc.env:...}` put into the saved file must not read this machine's environment
        saved_tree = cast(
            dict[str, Any], OmegaConf.to_container(read_saved_config(saved_path), resolve=False)
        )
    except RestoreError as error:
        raise ConfigError(f"train.resume=true: {error}") from None
    move_keys(saved_tree)
    saved = flatten(saved_tree)
    new_tree = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    move_keys(new_tree)  # both sides read as today's keys
    new = flatten(new_tree)
    errors: list[str] = []
    warnings: list[str] = []
    for key in sorted(set(saved) | set(new)):
        if key not in saved:
            warnings.append(
                f"{key}={new[key]!r} (not in the saved config, written by an older version)"
            )
        elif key not in new:
            warnings.append(f"{key} (saved as {saved[key]!r}) no longer exists")
        elif saved[key] != new[key]:
            change = f"{key}: {saved[key]!r} -> {new[key]!r}"
            (warnings if _may_change(key) else errors).append(change)
    if saved_world_size != world_size:
        errors.append(
            f"number of ranks: {saved_world_size} -> {world_size} (resuming on another number of ranks is not "
            f"supported: the ZeRO partitions and the data position are per rank; DeepSpeed's universal checkpoint "
            f"conversion, ds_to_universal, is not wired into falqon_dist)"
        )
    if errors:
        raise ConfigError(
            f"train.resume=true: the run in {run_dir} cannot continue with this config; "
            f"nothing was changed. Differences that change what the checkpoint is: "
            f"{'; '.join(errors)}. Use the saved values, or a new run.dir."
        )
    schedule = [w for w in warnings if w.split(":")[0] in SCHEDULE_KEYS]
    if schedule:
        warnings.append("the learning-rate schedule changes from the resumed step on")
    return [w for w in warnings if not w.startswith(("run.dir", "run.overwrite", "train.resume"))]
