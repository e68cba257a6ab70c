"""Rank-0 outputs of a run: train.log, metrics.jsonl, the resolved config, a progress bar.

Every writer is a no-op on ranks other than 0, so the training loop can call them unconditionally.
Both files are opened without following a symbolic link (:mod:`falqon_dist.files`): a link planted
at ``train.log`` or ``metrics.jsonl`` is refused, never appended through to its target.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, cast

from tqdm.auto import tqdm

from falqon_dist.files import open_no_follow, write_atomic

LOGGER_NAME = "falqon_dist"

#: Lines said before train.log existed (:func:`note_before_logging`), written into it when it opens.
_EARLY_NOTES: list[str] = []


def note_before_logging(message: str) -> None:
    """Say ``message`` on stderr now (rank 0 calls this before logging is set up, e.g. where
    ``run.overwrite=true`` moved the previous run), and again into ``train.log`` once
    :func:`setup_logging` opens it, so the run's own log says it too."""
    print(f"falqon_dist: {message}", file=sys.stderr, flush=True)
    _EARLY_NOTES.append(message)


class NoFollowFileHandler(logging.FileHandler):
    """A :class:`logging.FileHandler` whose file is opened with :func:`~falqon_dist.files.open_no_follow`:
    a symbolic link (or a FIFO, or a hard-linked file) at the log's name raises
    :class:`~falqon_dist.files.UnsafeFileError` naming it instead of writing through it."""

    def _open(self) -> io.TextIOWrapper:
        """The one place FileHandler opens its stream (at construction and after a close)."""
        stream = open_no_follow(
            self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors
        )
        return cast(io.TextIOWrapper, stream)  # text mode: os.fdopen's TextIOWrapper


def setup_logging(run_dir: Path, rank: int) -> logging.Logger:
    """Console + ``run_dir/train.log`` on rank 0; warnings and errors only on other ranks."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if rank == 0:
        file_handler = NoFollowFileHandler(run_dir / "train.log")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
        logger.setLevel(logging.INFO)
        for note in _EARLY_NOTES:  # already on stderr: into the file only
            file_handler.handle(
                logger.makeRecord(LOGGER_NAME, logging.WARNING, __file__, 0, note, (), None)
            )
        _EARLY_NOTES.clear()
    else:
        logger.setLevel(logging.WARNING)
    return logger


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (rank 0 only).

    On resume, lines of steps after the resumed step (written by the interrupted run after its last
    checkpoint) are dropped, so the file reads as one consistent history.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            with open_no_follow(path, "r") as handle:
                lines = handle.read().splitlines()
            kept = [line for line in lines if line.strip() and _step_of(line) <= resume_step]
            # a crash here keeps the old history
            write_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line (never through a symbolic link at ``metrics.jsonl``)."""
        if not self.enabled:
            return
        with open_no_follow(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """A step progress bar on rank 0, silent when stderr is not a terminal (CI, log files)."""
    return tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="step",
        disable=not (enabled and sys.stderr.isatty()),
    )


class ProgressClock:
    """``step 12/300 (4%), 3.1 s/step, eta 0:14:52`` for the per-step log line: a log file or CI
    output shows how far a run is and when it ends, as the tqdm bar does on a terminal. The rate is
    measured from the first step this process ran (a resumed run does not count the steps before)."""

    def __init__(self, total: int, initial: int) -> None:
        self.total, self.initial = total, initial
        self.started = time.monotonic()

    def describe(self, step: int) -> str:
        done = step - self.initial
        share = f"{step}/{self.total} ({100 * step // max(1, self.total)}%)"
        if done <= 0:
            return f"step {share}"
        per_step = (time.monotonic() - self.started) / done
        eta = dt.timedelta(seconds=round(per_step * max(0, self.total - step)))
        return f"step {share}, {per_step:.2f} s/step, eta {eta}"
