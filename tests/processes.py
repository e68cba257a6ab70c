"""Run launcher commands so a test that fails or times out never leaves its process tree behind.

``subprocess.run(..., capture_output=True, timeout=T)`` is not enough for launchers: on timeout it
kills only the direct child (``deepspeed`` or ``torchrun``), then waits for EOF on the pipes, which
the orphaned ranks still hold open, so the test hangs far past ``T`` while the ranks keep ports,
build locks and CPU busy for every test after it. Here each command runs in its own session with
its output in anonymous files (no pipe can fill or be held), and on timeout, on any exception
(pytest-timeout included) and on exit the whole group is killed: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

#: How long a group gets between SIGTERM and SIGKILL.
GRACE_S = 10.0


class ProcessGroup:
    """``cmd`` started as the leader of a new session; use as a context manager."""

    def __init__(self, cmd: Sequence[str], *, cwd: Path | str, env: dict[str, str]) -> None:
        self.cmd = [str(part) for part in cmd]
        # closed by __exit__ (the process writes into them until then)
        self._stdout = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=cwd,
            env=env,
            stdout=self._stdout,
            stderr=self._stderr,
            text=True,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, signum: int) -> None:
        """Signal the leader only (as a scheduler that knows one PID would)."""
        self.proc.send_signal(signum)

    def output(self) -> tuple[str, str]:
        """(stdout, stderr) written so far."""
        texts = []
        for handle in (self._stdout, self._stderr):
            handle.flush()
            handle.seek(0)
            texts.append(handle.read())
        return texts[0], texts[1]

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """Wait for the leader; on timeout kill the group and fail naming the command and its output."""
        try:
            returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            stdout, stderr = self.output()
            raise AssertionError(
                f"{' '.join(self.cmd)} still running after {timeout:.0f}s; killed its process "
                f"group\n{(stdout + stderr)[-6000:]}"
            ) from None
        self.kill()  # ranks a leader left behind (it exited, they did not)
        stdout, stderr = self.output()
        return subprocess.CompletedProcess(self.cmd, returncode, stdout, stderr)

    def kill(self) -> None:
        """SIGTERM to every process of the group, SIGKILL to what is left after GRACE_S."""
        for signum, wait_s in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                if self.proc.poll() is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=0.2)
                else:
                    time.sleep(0.2)
            if not _group_alive(self.proc.pid):
                break
        if self.proc.poll() is None:
            self.proc.wait()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._stdout.close()
        self._stderr.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run(
    cmd: Sequence[str], *, cwd: Path | str, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion (see ProcessGroup); its group is gone when this returns or raises."""
    with ProcessGroup(cmd, cwd=cwd, env=env) as group:
        return group.wait(timeout)
