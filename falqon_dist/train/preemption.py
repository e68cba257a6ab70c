"""Preemption: SIGTERM / SIGINT, or the launcher's death, become "finish this step, save, exit".

:class:`Preemption` turns SIGTERM/SIGINT into a stop request: the signal sets a flag that the step's
one all-reduce carries to every rank (so all stop after the same step), and a rank whose launcher
dies is stopped the same way: ``PR_SET_PDEATHSIG`` for its parent, and a watch on the launcher
processes above it (the ``deepspeed`` command runs ``deepspeed.launcher.launch``, which runs the
ranks: a signal to the ``deepspeed`` PID alone used to leave the ranks training). The trainer saves
and raises :class:`Preempted`, whose exit status is ``128 + signum``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from pathlib import Path

from falqon_dist.distributed.waits import say

__all__ = ["LAUNCHER_MARKS", "Preempted", "Preemption", "launcher_ancestors"]


class Preempted(Exception):
    """A stop requested by a signal; the run saved at ``step`` and exits with ``128 + signum``."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(
            f"preempted at step {step} ({signal.Signals(signum).name}); resume with train.resume=true"
        )
        self.step, self.signum = step, signum


class Preemption:
    """SIGTERM / SIGINT → a stop request, honoured after the current step on every rank.

    A second SIGINT interrupts at once (the usual Ctrl-C twice). ``install`` also asks the kernel to
    send SIGTERM to this process when its parent (the launcher) dies.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._request)
        signal.signal(signal.SIGINT, self._request)
        _die_with_parent()
        launchers = launcher_ancestors()
        if launchers:
            threading.Thread(
                target=self._watch, args=(launchers,), name="falqon-launcher-watch", daemon=True
            ).start()

    def _watch(self, launchers: dict[int, str], poll_s: float = 1.0) -> None:
        """Request a stop (as SIGTERM would) as soon as any launcher above this rank is gone."""
        stop = threading.Event()
        while not stop.wait(poll_s):
            gone = [pid for pid, started in launchers.items() if _start_time(pid) != started]
            if gone:
                # first: the output below may go nowhere
                self.signum = self.signum or signal.SIGTERM
                say(
                    f"launcher process {gone[0]} exited: stopping after this step and saving a checkpoint"
                )
                return

    def _request(self, signum: int, _frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        say(
            f"{signal.Signals(signum).name} received: stopping after this step and saving a checkpoint"
        )

    @property
    def requested(self) -> bool:
        return self.signum is not None


def _die_with_parent() -> None:
    """SIGTERM when the parent process exits (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # no prctl: the launcher's own forwarding is all there is
        pass


#: Command-line fragments of the launcher processes a rank must not outlive.
LAUNCHER_MARKS = ("deepspeed", "torch.distributed.run", "torchrun")


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (so a recycled PID does not count as alive), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def launcher_ancestors() -> dict[int, str]:
    """``{pid: start time}`` of the launcher processes above this one (Linux ``/proc``; else empty)."""
    found: dict[int, str] = {}
    pid = os.getppid()
    while pid > 1:
        try:
            cmdline = (
                Path(f"/proc/{pid}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if not any(mark in cmdline for mark in LAUNCHER_MARKS):
            break
        started = _start_time(pid)
        if started is not None:
            found[pid] = started
        pid = parent
    return found
