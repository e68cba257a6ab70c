"""TensorBoard logging (``logger=tensorboard`` or ``logger=wandb_tensorboard``) that can never stop training.

Rank 0 writes event files under ``run_dir/tensorboard`` (``tensorboard --logdir runs/``): every
numeric metric of metrics.jsonl as a scalar at its optimizer step, and the run's resolved config as
text. It needs the ``tensorboard`` package (checked before any work starts); any exception while
writing is logged once and TensorBoard logging is switched off.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("falqon_dist")

SUBDIR = "tensorboard"


def check_tensorboard() -> None:
    """ImportError naming the package when ``tensorboard`` is not installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ImportError(
            "logger=tensorboard needs the tensorboard package: pip install tensorboard "
            "(or pip install -e .[tensorboard]); or choose logger=none|wandb"
        ) from None


class TensorBoardLogger:
    """Scalars per step into ``run_dir/tensorboard``; a no-op when not ``enabled`` (ranks other than 0)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], *, enabled: bool) -> None:
        self._writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / SUBDIR))
            self._writer.add_text(
                "config", f"```\n{json.dumps(config, indent=2, default=str)}\n```", 0
            )
        except Exception as error:  # noqa: BLE001 - logging must never stop training
            self._disable(error)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._writer is None:
            return
        try:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(name, value, step)
            self._writer.flush()
        except Exception as error:  # noqa: BLE001
            self._disable(error)

    def finish(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as error:  # noqa: BLE001
                log.warning("TensorBoard: closing the event file failed (%s)", error)
            self._writer = None

    def _disable(self, error: Exception) -> None:
        log.warning(
            "TensorBoard logging failed (%s: %s); it is switched off, training goes on",
            type(error).__name__,
            error,
        )
        self._writer = None
