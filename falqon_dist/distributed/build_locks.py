"""Stale torch-extension build locks, found and cleared before DeepSpeed builds or loads an op.

DeepSpeed JIT-builds its ops (the CPU communication op, fused Adam, ...) through
``torch.utils.cpp_extension.load``, which serializes builders with a *baton*: a plain file
``<build dir>/lock`` created with ``O_EXCL`` and removed when the build ends. A process killed while
it holds the baton leaves the file behind, and from then on every run on the machine waits for it
forever, without a word. torch writes nothing into the file, so :func:`stamp_build_locks` (called by
every falqon_dist process before DeepSpeed may build) makes each baton this process takes record
its owner in it: host, boot, PID namespace, pid and the pid's start time. A lock is then judged:

* a process on this host holds the file open (torch keeps the baton's descriptor open while it
  builds; seen in ``/proc/<pid>/fd``), or its recorded owner is on this host and alive → a live
  build: wait for it, saying so, up to ``wait_s``;
* its recorded owner is on this host and that process is gone (or its pid now belongs to a process
  started later) → stale: removed at once, with a warning naming the file and the dead owner;
* its owner is on another host of a shared file system (its liveness cannot be checked from here)
  or unknown (an empty lock: a process that does not stamp, such as a plain ``torch`` build) →
  stale only once nothing in its build directory has changed for ``quiet_s``, by default
  :data:`BUILD_QUIET_BOUND_S` (30 minutes: longer than any real build goes without writing a file);
  until then it is waited for while it changes.

Only one process per host removes (local rank 0, ``remove=True``): the others wait until the lock
is gone, so no rank can delete a lock another rank has just taken. If a lock is still in place after
``wait_s``, :class:`StaleLockError` names it, its owner and how to clear it.
The extensions root is torch's: ``$TORCH_EXTENSIONS_DIR`` (op directories directly below it) or
``<default build root>/py<major><minor>_<accelerator>``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from falqon_dist.distributed.waits import announced, say

#: Seconds a build lock whose owner cannot be checked from here (another host, or not recorded) must
#: go without a change in its build directory before it counts as stale. One nvcc compile of a large
#: CUDA op on a busy node takes minutes and writes nothing until its object file is done, and on a
#: shared file system the builder may be on another host; the old 30 s took such live builds for
#: stale and deleted their lock, letting a second build run over the first. A lock whose owner is
#: on this host is judged by that process at once, never by this bound.
BUILD_QUIET_BOUND_S = 30 * 60.0

#: How a stamped lock starts (then ``key=value`` fields); an empty lock file is torch's own.
OWNER_PREFIX = "falqon_dist build lock:"


class StaleLockError(RuntimeError):
    """A build lock that could not be cleared or waited out."""


def _read(path: str) -> str | None:
    with contextlib.suppress(OSError):
        return Path(path).read_text().strip()
    return None


def this_host() -> dict[str, str]:
    """What tells two processes apart that share a hostname: the host, its boot, the PID namespace
    (two containers of one machine share a boot but not their PIDs)."""
    return {
        "host": socket.gethostname(),
        "boot": _read("/proc/sys/kernel/random/boot_id") or "?",
        "pidns": (
            os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else "?"
        ).replace(" ", ""),
    }


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks after boot, ``/proc/<pid>/stat`` field 22); None if no
    such process runs (or only its zombie is left). With the pid it names one process: a pid reused
    later has another start time."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    # after "pid (comm)"; comm may hold spaces and parentheses
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) <= 19 or fields[0] in (
        "Z",
        "X",
    ):  # a zombie has exited: it builds nothing any more
        return None
    return fields[19]


def owner_line(pid: int | None = None) -> str:
    """The owner record :func:`stamp_build_locks` writes into a lock this process takes."""
    pid = os.getpid() if pid is None else pid
    fields = {
        **this_host(),
        "pid": str(pid),
        "start": _start_time(pid) or "?",
        "since": dt.datetime.now().isoformat(timespec="seconds"),
    }
    return f"{OWNER_PREFIX} " + " ".join(f"{key}={value}" for key, value in fields.items()) + "\n"


def read_owner(lock: Path) -> dict[str, str] | None:
    """The owner recorded in ``lock`` (``host``, ``boot``, ``pidns``, ``pid``, ``start``, ``since``),
    or None: an empty lock (torch's own), one being stamped, or unreadable."""
    text = _read(str(lock))
    if not text or not text.startswith(OWNER_PREFIX):
        return None
    owner = dict(field.split("=", 1) for field in text[len(OWNER_PREFIX) :].split() if "=" in field)
    return owner if owner.get("pid", "").isdigit() and "host" in owner else None


def _stamp(lock: Path) -> None:
    """Write this process as ``lock``'s owner (best effort: an unstamped lock is only judged more slowly)."""
    with contextlib.suppress(OSError):
        fd = os.open(lock, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, owner_line().encode())  # one write: a reader sees all of it or nothing
        finally:
            os.close(fd)


def stamp_build_locks() -> None:
    """From now on, every build lock this process takes (torch's ``FileBaton``, which
    ``cpp_extension`` and so DeepSpeed's op builder use) records this process as its owner, so a
    run on this host can tell a dead builder's lock from a live one at once. Idempotent. torch's
    baton only tests whether the file exists, never reads it."""
    from torch.utils.file_baton import FileBaton

    if getattr(FileBaton.try_acquire, "_falqon_stamps", False):
        return
    original = FileBaton.try_acquire

    def try_acquire(self: FileBaton) -> bool | None:
        acquired = original(self)
        if acquired:
            _stamp(Path(self.lock_file_path))
        return acquired

    try_acquire._falqon_stamps = True  # type: ignore[attr-defined]
    try_acquire.__doc__ = original.__doc__
    FileBaton.try_acquire = try_acquire  # type: ignore[method-assign]


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
    """``("gone" | "held" | "busy" | "stale", detail)`` for one lock file (see the module doc)."""
    if not lock.exists():
        return "gone", ""
    holders = lock_holders(lock)
    if holders:
        return "held", f"held by pid {', '.join(map(str, holders))}"
    owner = read_owner(lock)
    here = this_host()
    if owner is not None and all(owner.get(key) == here[key] for key in here):
        pid, since = int(owner["pid"]), owner.get("since", "?")
        started = _start_time(pid)
        if started is not None and owner.get("start") in (
            started,
            "?",
        ):  # "?": its start was unreadable
            return "held", f"built by pid {pid} on this host since {since}, still running"
        return "stale", f"its builder, pid {pid} on this host (since {since}), is gone"
    if owner is not None:
        since = owner.get("since", "?")
        who = f"built by pid {owner['pid']} on {owner['host']} since {since}, which this host cannot check"
    else:
        who = "its builder is unknown: nothing recorded in it, no process here holds it"
    quiet = time.time() - _last_change(lock.parent)
    if quiet < quiet_s:
        return (
            "busy",
            f"{who}; {lock.parent} changed {quiet:.0f}s ago, stale after {quiet_s:.0f}s without a change",
        )
    return "stale", f"{who}, and {lock.parent} has not changed for {quiet:.0f}s"


def clear_stale_build_locks(
    root: Path | None = None,
    *,
    quiet_s: float = BUILD_QUIET_BOUND_S,
    wait_s: float = 600.0,
    poll_s: float = 0.5,
    remove: bool = True,
    emit: Callable[[str], None] = say,
) -> list[Path]:
    """Remove stale build locks under ``root`` (default :func:`extensions_root`), wait out live ones.

    ``quiet_s``: how long a lock whose owner cannot be checked must go without a change in its
    build directory to count as stale (:data:`BUILD_QUIET_BOUND_S`). ``remove=False`` waits for
    stale locks to disappear instead of removing them (every process of a host but one). Returns
    the locks removed. Raises :class:`StaleLockError` naming a lock still in place after ``wait_s``
    seconds. Never blocks without a line every few seconds.
    """
    root = extensions_root() if root is None else root
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for lock in sorted(root.glob("*/lock")):
        deadline = time.monotonic() + wait_s
        detail = ""

        def what(lock: Path = lock) -> str:
            return f"the build lock {lock} ({detail})"  # noqa: B023 - the detail as it is now

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
                    emit(
                        f"removed the stale build lock {lock} ({detail}): a run killed while "
                        f"building the {lock.parent.name!r} op left it behind"
                    )
                    removed.append(lock)
                    break
                if time.monotonic() > deadline:
                    raise StaleLockError(
                        f"the build lock {lock} is still in place after {wait_s:.0f}s ({detail}); if no "
                        f"build of {lock.parent.name!r} is running on any host, delete it: rm {lock}"
                    )
                time.sleep(poll_s)
    return removed
