"""DeepSpeed's CPU shared-memory segments: unlinked once every rank has mapped them, stale ones swept.

On CPU, when every rank runs on one host (``LOCAL_SIZE == WORLD_SIZE``, which the ``deepspeed``
launcher exports), ``deepspeed.init_distributed`` loads its shared-memory communication op, and
each rank creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``
(the op's workspace, about 67 MB) and maps every peer's. DeepSpeed never unlinks them: every run,
finished or killed, leaves ``world_size`` × 67 MB of RAM-backed tmpfs behind, until the host runs
out of memory (a few hundred runs fill a 24 GiB machine and everything on it starts to thrash).

POSIX keeps a mapping valid after its name is unlinked. So once every rank has mapped every segment
(a barrier after the set-up), each rank unlinks its own (:func:`release_own_segment`): the op keeps
working, and nothing is left behind however the run ends. Segments that earlier runs left (no live
process maps or holds them, untouched for ``STALE_AFTER_S``) are swept by local rank 0 before the
set-up (:func:`sweep_stale_segments`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from falqon_dist.distributed.waits import say

SHM_DIR = Path("/dev/shm")
#: DeepSpeed's name for the segments (``SHM_BUFFER_NAME`` in its ``csrc/cpu/comm/shm.cpp``).
PREFIX = "deepspeed_allreduce_buffer"
#: A segment younger than this may belong to a run that is starting now (created, not yet mapped).
STALE_AFTER_S = 600.0


def own_segment(rank: int | None = None) -> Path:
    """The segment DeepSpeed creates for ``rank`` (default: this process's RANK) of this job."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_own_segment(rank: int | None = None) -> Path | None:
    """Unlink this rank's segment; call only after every rank has finished DeepSpeed's set-up (a
    barrier), since a peer that has not mapped it yet would wait for it forever. Returns the path
    unlinked, or None where DeepSpeed created none (GPUs, ranks on several hosts, no shm op)."""
    segment = own_segment(rank)
    try:
        segment.unlink()
    except FileNotFoundError:
        return None
    return segment


def segments_in_use() -> set[str]:
    """Paths of segments some live process on this host (visible to this user) maps or holds open."""
    used: set[str] = set()
    marker = str(SHM_DIR / PREFIX)
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            with open(entry / "maps") as maps:
                for line in maps:
                    start = line.find(marker)
                    if start >= 0:
                        used.add(line[start:].split()[0])
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(marker):
                    used.add(target.split()[0])
        except OSError:  # gone, or another user's process
            continue
    return used


def sweep_stale_segments(
    *, stale_after_s: float = STALE_AFTER_S, emit: Callable[[str], None] = say
) -> list[Path]:
    """Unlink this user's DeepSpeed segments that no live process uses and nobody touched for
    ``stale_after_s``; one line says how many and how much memory came back. Returns them."""
    if not SHM_DIR.is_dir():
        return []
    candidates = sorted(SHM_DIR.glob(f"{PREFIX}_{os.getuid()}_*"))
    if not candidates:
        return []
    used, now, removed, freed = segments_in_use(), time.time(), [], 0
    for segment in candidates:
        try:
            stat = segment.stat()
            if str(segment) in used or now - stat.st_mtime < stale_after_s:
                continue
            segment.unlink()
        except OSError:  # removed meanwhile by another sweeper
            continue
        removed.append(segment)
        freed += stat.st_size
    if removed:
        emit(
            f"removed {len(removed)} stale DeepSpeed shared-memory segment(s) ({freed / 2**20:.0f} MiB of "
            f"RAM) that earlier runs left in {SHM_DIR}"
        )
    return removed
