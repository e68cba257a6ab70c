"""Stale torch-extension build locks, found and cleared before DeepSpeed builds or loads an op.

DeepSpeed JIT-builds its ops (the CPU communication op, fused Adam, ...) through
``torch.utils.cpp_extension.load``, which serializes builders with a *baton*: a plain file
``<build dir>/lock`` created with ``O_EXCL`` and removed when the build ends. A process killed while
it holds the baton leaves the file behind, and from then on every run on the machine waits for it
forever, without a word. A plain file carries no owner, so the check here decides from the outside:

* a process on this host holds the file open (torch keeps the baton's descriptor open while it
  builds; seen in ``/proc/<pid>/fd``) → a live build: wait for it, saying so, up to ``wait_s``;
* nobody here holds it and nothing in its build directory changed for ``quiet_s`` → stale: remove
  it with a warning naming the file;
* nobody visible holds it but the directory is still changing (a build on another host sharing the
  file system, or a process whose descriptors this user cannot see) → wait while it changes.

Only one process per host removes (local rank 0, ``remove=True``): the others wait until the lock
is gone, so no rank can delete a lock another rank has just taken. If a lock is still in place after
``wait_s``, :class:`StaleLockError` names it and how to clear it.
The extensions root is torch's: ``$TORCH_EXTENSIONS_DIR`` (op directories directly below it) or
``<default build root>/py<major><minor>_<accelerator>``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from falqon_dist.distributed.waits import announced, say


class StaleLockError(RuntimeError):
    """A build lock that could not be cleared or waited out."""


def extensions_root() -> Path:
    """Where torch's JIT extension builds (and their locks) live, as ``cpp_extension`` computes it."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def lock_holders(lock: Path) -> list[int]:
    """PIDs of the processes on this host (visible to this user) that hold ``lock`` open."""
    target, holders = str(lock.resolve()), []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) == target:
                    holders.append(int(entry.name))
                    break
        except OSError:  # gone, or another user's process
            continue
    return [pid for pid in holders if pid != os.getpid()]


def _last_change(directory: Path) -> float:
    """The newest modification time of ``directory`` and the files directly in it."""
    newest = 0.0
    for path in (directory, *directory.iterdir()):
        try:
            newest = max(newest, path.stat().st_mtime)
        except OSError:
            continue
    return newest


def _state(lock: Path, quiet_s: float) -> tuple[str, str]:
    """``("gone" | "held" | "busy" | "stale", detail)`` for one lock file."""
    if not lock.exists():
        return "gone", ""
    holders = lock_holders(lock)
    if holders:
        return "held", f"held by pid {', '.join(map(str, holders))}"
    quiet = time.time() - _last_change(lock.parent)
    if quiet < quiet_s:
        return "busy", f"no holder visible here, but {lock.parent} changed {quiet:.0f}s ago"
    return "stale", f"no process holds it and {lock.parent} has not changed for {quiet:.0f}s"


def clear_stale_build_locks(
    root: Path | None = None,
    *,
    quiet_s: float = 30.0,
    wait_s: float = 600.0,
    poll_s: float = 0.5,
    remove: bool = True,
    emit: Callable[[str], None] = say,
) -> list[Path]:
    """Remove stale build locks under ``root`` (default :func:`extensions_root`), wait out live ones.

    ``remove=False`` waits for stale locks to disappear instead of removing them (every process of a
    host but one). Returns the locks removed. Raises :class:`StaleLockError` naming a lock still in place after
    ``wait_s`` seconds. Never blocks without a line every few seconds.
    """
    root = extensions_root() if root is None else root
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for lock in sorted(root.glob("*/lock")):
        deadline = time.monotonic() + wait_s
        detail = ""

        def what(lock: Path = lock) -> str:
            return f"the build lock {lock} ({detail})"

        with announced(what, emit=emit):
            while True:
                state, detail = _state(lock, quiet_s)
                if state == "gone":
                    break
                if state == "stale" and not remove:
                    detail += "; waiting for local rank 0 to clear it"
                elif state == "stale":
                    try:
                        lock.unlink()
                    except FileNotFoundError:  # another rank on this host cleared it first
                        break
                    emit(f"removed the stale build lock {lock} ({detail}): a run killed while "
                         f"building the {lock.parent.name!r} op left it behind")
                    removed.append(lock)
                    break
                if time.monotonic() > deadline:
                    raise StaleLockError(
                        f"the build lock {lock} is still in place after {wait_s:.0f}s ({detail}); if no "
                        f"build of {lock.parent.name!r} is running, delete it: rm {lock}"
                    )
                time.sleep(poll_s)
    return removed
