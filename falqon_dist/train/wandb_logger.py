"""Weights & Biases logging that can never stop training.

Rank 0 only. Mode ``auto`` logs online when credentials exist (``WANDB_API_KEY`` or a ``wandb
login`` entry in ~/.netrc) and offline otherwise; ``disabled`` turns it off. The run id is kept in
``run_dir/wandb_run_id`` so a resumed training continues the same W&B run. Any exception from W&B is
logged once and logging is switched off; training goes on.

The key may also come from a file named by ``FALQON_WANDB_KEY_FILE`` (what ``launch/multinode.sh``
forwards to remote ranks instead of the key: DeepSpeed's launcher puts every forwarded variable on
pdsh's command line and in its log). :func:`load_key_file` reads it into rank 0's own environment
just before W&B starts; its value is never logged, only the file's path.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import stat
import uuid
from pathlib import Path
from typing import Any, Literal, cast

from falqon_dist.files import write_atomic

log = logging.getLogger("falqon_dist")

VALID_MODES = ("auto", "online", "offline", "disabled")
#: The environment variable naming a file that holds the W&B API key (one line; launch/multinode.sh).
KEY_FILE_VAR = "FALQON_WANDB_KEY_FILE"


def load_key_file() -> bool:
    """Set ``WANDB_API_KEY`` from the file ``FALQON_WANDB_KEY_FILE`` names; True if it did.

    Why a file: a key in the environment of the DeepSpeed launcher only reaches remote ranks on a
    command line (``export KEY=VALUE`` before pdsh's remote command, visible in ``ps`` and logged at
    INFO). ``launch/multinode.sh`` writes the key to a 0600 file instead and forwards its path. Does
    nothing if ``WANDB_API_KEY`` is already set or no file is named. A file that cannot be read here
    (not on a file system this host shares), that is empty or holds more than one line is a warning
    naming the file and the host, and W&B goes on without the key (``wandb.mode=auto``: offline);
    one readable by other users is used with a warning. The key itself is never logged.
    """
    path = os.environ.get(KEY_FILE_VAR)
    if not path or os.environ.get("WANDB_API_KEY"):
        return False
    where = f"{KEY_FILE_VAR}={path} on {socket.gethostname()}"
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().strip().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = (
            error.strerror
            if isinstance(error, OSError) and error.strerror
            else type(error).__name__
        )
        log.warning(
            "W&B key file %s cannot be read (%s): W&B goes on without the key; the file must be at the "
            "same path on rank 0's host (launch/multinode.sh: FALQON_SECRETS_DIR on a shared file system)",
            where,
            reason,
        )
        return False
    if len(lines) != 1 or not lines[0].strip():
        log.warning(
            "W&B key file %s holds %s, not one line with the key: W&B goes on without the key",
            where,
            "nothing" if not lines else f"{len(lines)} lines",
        )
        return False
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "W&B key file %s is readable by other users (mode %o): make it 0600 (launch/multinode.sh does)",
            where,
            stat.S_IMODE(mode),
        )
    os.environ["WANDB_API_KEY"] = lines[0].strip()
    log.info("W&B key read from %s (%s)", path, KEY_FILE_VAR)
    return True


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return rc.authenticators(host) is not None


def resolve_mode(mode: str) -> Literal["online", "offline", "disabled"]:
    """``wandb.mode`` as ``wandb.init`` takes it: ``auto`` is online with credentials, else offline."""
    if mode not in VALID_MODES:
        raise ValueError(f"wandb.mode must be one of {VALID_MODES}, got {mode!r}")
    if mode == "auto":
        return "online" if has_credentials() else "offline"
    return cast(Literal["online", "offline", "disabled"], mode)


class WandbLogger:
    """Thin, failure-proof wrapper around one ``wandb`` run."""

    def __init__(
        self, settings: dict[str, Any], run_dir: Path, config: dict[str, Any], enabled: bool
    ) -> None:
        self.run = None
        if not enabled:
            return
        load_key_file()  # before the mode is resolved: the key in a file counts as credentials
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
            write_atomic(id_file, run_id)
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
