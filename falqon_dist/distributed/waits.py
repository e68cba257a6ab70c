"""Waits that say what they wait for: a line after a few seconds, then one per interval.

A distributed run spends its start-up and its checkpoints waiting on others — peers joining the
rendezvous, rank 0 choosing the run directory, another process building the tiny model or a
DeepSpeed op, every rank finishing a save. When one of those never comes, the libraries sleep without
a word (gloo's default timeout is 30 minutes). Every such wait in falqon_dist runs inside
:func:`announced`, which prints, from a daemon thread so the blocked call itself is untouched:

    [falqon_dist rank 0] waiting 10s for rank(s) 1 to join the rendezvous at 127.0.0.1:29500 (since 12:00:01)

The bound itself is the process group's timeout (``dist.timeout_s``) or the wait's own deadline.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: Seconds before the first line, and between lines.
FIRST_NOTICE_S = 5.0
NOTICE_EVERY_S = 10.0


def say(message: str) -> None:
    """One line on stderr, tagged with this process's rank (logging may not be set up yet). Never
    raises: a launcher that died may have taken its pipe with it."""
    rank = os.environ.get("RANK", "0")
    with contextlib.suppress(OSError, ValueError):
        print(f"[falqon_dist rank {rank}] {message}", file=sys.stderr, flush=True)


@contextmanager
def announced(
    what: str | Callable[[], str],
    *,
    first_s: float = FIRST_NOTICE_S,
    every_s: float = NOTICE_EVERY_S,
    emit: Callable[[str], None] = say,
) -> Iterator[None]:
    """Run the block; if it takes longer than ``first_s``, emit ``waiting Ns for <what> (since T)``
    then every ``every_s`` until it ends. ``what`` may be a callable, re-evaluated for every line
    (e.g. to name the ranks still missing)."""
    done = threading.Event()
    start, since = time.monotonic(), dt.datetime.now().strftime("%H:%M:%S")

    def notify() -> None:
        delay = first_s
        while not done.wait(delay):
            text = what() if callable(what) else what
            emit(f"waiting {time.monotonic() - start:.0f}s for {text} (since {since})")
            delay = every_s

    thread = threading.Thread(target=notify, name="falqon-wait-notice", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=1.0)


def barrier(what: str) -> None:
    """``torch.distributed.barrier()`` (when a group is up) that names what the ranks wait for."""
    import torch.distributed as tdist

    if tdist.is_initialized() and tdist.get_world_size() > 1:
        with announced(f"all ranks to {what} (a barrier; bounded by dist.timeout_s)"):
            tdist.barrier()


def errors_of_every_rank(error: str | None, what: str) -> dict[int, str]:
    """The errors the ranks met in a step every rank runs (``error``: this rank's, None if it
    succeeded), gathered on every rank (one ``all_gather_object``), so that all leave together and
    one rank can say it once: ``{rank: error}`` of the ranks that failed."""
    import torch.distributed as tdist

    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return {} if error is None else {0: error}
    gathered: list[str | None] = [None] * tdist.get_world_size()
    with announced(f"all ranks to {what} (bounded by dist.timeout_s)"):
        tdist.all_gather_object(gathered, error)
    return {rank: message for rank, message in enumerate(gathered) if message is not None}
