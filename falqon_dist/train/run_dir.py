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
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from falqon_dist.train.config_errors import ConfigError
from falqon_dist.train.config_migrations import move_keys

log = logging.getLogger("falqon_dist")

LOCK_NAME = ".lock"

#: Keys a resume may change (a key equal to an entry or below it), and which of them re-shape the schedule.
RESUME_MAY_CHANGE = (
    "run.dir", "train.max_steps", "train.epochs", "train.lr", "train.warmup_steps", "train.warmup_ratio", "train.schedule",
    "train.min_lr_ratio", "train.save_every", "train.keep_checkpoints", "train.eval_every", "train.eval_samples",
    "train.eval_generate_samples", "train.resume", "train.log_every", "train.max_nonfinite_steps",
    "train.saturation_warn", "train.saturation_abort", "logger", "wandb", "export", "dist", "fp8.cast",
)
SCHEDULE_KEYS = ("train.max_steps", "train.epochs", "train.lr", "train.warmup_steps", "train.warmup_ratio", "train.schedule",
                 "train.min_lr_ratio")


class RunDirBusy(RuntimeError):
    """Another live run holds this run directory."""


class RunDirLock:
    """The exclusive lock of one run directory, held until :meth:`release` or process exit."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_NAME
        self._handle = open(self.path, "a+")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "unknown"
            self._handle.close()
            raise RunDirBusy(
                f"run.dir {run_dir} is in use by another run ({holder}); wait for it to finish, or choose another "
                f"run.dir"
            ) from None
        self._handle.seek(0)
        previous = self._handle.read().strip()
        if previous:
            log.warning("run.dir %s: taking over the lock left by a run that no longer exists (%s)", run_dir, previous)
        self._handle.seek(0)
        self._handle.truncate()
        since = dt.datetime.now().isoformat(timespec="seconds")
        self._handle.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {since}\n")
        self._handle.flush()

    def release(self) -> None:
        if self._handle.closed:
            return
        self._handle.seek(0)
        self._handle.truncate()  # an empty lock file: nobody to take over from
        self._handle.flush()
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


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


def check_resume(run_dir: Path, cfg: DictConfig, world_size: int, saved_world_size: int | None) -> list[str]:
    """Raise :class:`ConfigError` if resuming ``run_dir`` with ``cfg`` cannot work; return warnings.

    ``saved_world_size``: the ranks that wrote the latest checkpoint (None: no checkpoint yet, in which
    case nothing is compared: the run starts from step 0).
    """
    saved_path = run_dir / "config.yaml"
    if saved_world_size is None or not saved_path.is_file():
        return []
    saved_tree = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    move_keys(saved_tree)
    saved = flatten(saved_tree)
    new = flatten(OmegaConf.to_container(cfg, resolve=True))
    errors, warnings = [], []
    for key in sorted(set(saved) | set(new)):
        if key not in saved:
            warnings.append(f"{key}={new[key]!r} (not in the saved config, written by an older version)")
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
            f"train.resume=true: the run in {run_dir} cannot continue with this config; nothing was changed. "
            f"Differences that change what the checkpoint is: {'; '.join(errors)}. Use the saved values, or a new run.dir."
        )
    schedule = [w for w in warnings if w.split(":")[0] in SCHEDULE_KEYS]
    if schedule:
        warnings.append("the learning-rate schedule changes from the resumed step on")
    return [w for w in warnings if not w.startswith("run.dir") and not w.startswith("train.resume")]
