"""Weights & Biases logging that can never stop training.

Rank 0 only. Mode ``auto`` logs online when credentials exist (``WANDB_API_KEY`` or a ``wandb
login`` entry in ~/.netrc) and offline otherwise; ``disabled`` turns it off. The run id is kept in
``run_dir/wandb_run_id`` so a resumed training continues the same W&B run. Any exception from W&B is
logged once and logging is switched off; training goes on.
"""

from __future__ import annotations

import logging
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("falqon_dist")

VALID_MODES = ("auto", "online", "offline", "disabled")


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return rc.authenticators(host) is not None


def resolve_mode(mode: str) -> str:
    if mode not in VALID_MODES:
        raise ValueError(f"wandb.mode must be one of {VALID_MODES}, got {mode!r}")
    if mode == "auto":
        return "online" if has_credentials() else "offline"
    return mode


class WandbLogger:
    """Thin, failure-proof wrapper around one ``wandb`` run."""

    def __init__(self, settings: dict[str, Any], run_dir: Path, config: dict[str, Any], enabled: bool) -> None:
        self.run = None
        if not enabled:
            return
        mode = resolve_mode(settings.get("mode", "auto"))
        if mode == "disabled":
            return
        id_file = run_dir / "wandb_run_id"
        try:
            import wandb

            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            self.run = wandb.init(
                project=settings.get("project"),
                entity=settings.get("entity"),
                name=settings.get("name"),
                group=settings.get("group"),
                tags=list(settings.get("tags") or []),
                config=config,
                dir=str(run_dir),
                id=run_id,
                resume="allow",
                mode=mode,
            )
            id_file.write_text(run_id)
            log.info("W&B run %s (%s mode) in %s", run_id, mode, run_dir / "wandb")
        except Exception as exc:  # noqa: BLE001 - logging must never kill training
            log.warning("W&B disabled: init failed (%s: %s)", type(exc).__name__, exc)
            self.run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B disabled: log failed (%s: %s)", type(exc).__name__, exc)
            self.run = None

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(values)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B summary failed (%s: %s)", type(exc).__name__, exc)

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B finish failed (%s: %s)", type(exc).__name__, exc)
        self.run = None
