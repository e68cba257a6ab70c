"""W&B logging never stops training, and mode ``auto`` follows the credentials."""

from __future__ import annotations

import sys
import types

import pytest

from falqon_dist.train import wandb_logger
from falqon_dist.train.wandb_logger import WandbLogger, resolve_mode


def test_auto_mode_follows_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "missing-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai login user password secret\n")
    netrc.chmod(0o600)
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode("auto") == "online"
    assert resolve_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match="wandb.mode"):
        resolve_mode("loud")


class _FailingRun:
    def __init__(self):
        self.summary = {}

    def log(self, *args, **kwargs):
        raise ConnectionError("network down")

    def finish(self):
        raise ConnectionError("network down")


def _fake_wandb(init):
    return types.SimpleNamespace(init=init)


def test_init_failure_disables_logging(monkeypatch, tmp_path):
    def init(**kwargs):
        raise RuntimeError("no wandb service")

    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(init))
    logger = WandbLogger({"mode": "offline"}, tmp_path, {}, enabled=True)
    assert logger.run is None
    logger.log({"loss": 1.0}, step=1)  # no exception
    logger.finish()


def test_log_failure_disables_logging_and_keeps_the_run_id(monkeypatch, tmp_path):
    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        return _FailingRun()

    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(init))
    logger = WandbLogger({"mode": "offline", "project": "p"}, tmp_path, {"a": 1}, enabled=True)
    assert seen["resume"] == "allow" and seen["config"] == {"a": 1} and seen["mode"] == "offline"
    run_id = (tmp_path / "wandb_run_id").read_text()
    assert seen["id"] == run_id
    logger.log({"loss": 1.0}, step=1)
    assert logger.run is None  # switched off after the failure, training goes on
    again = WandbLogger({"mode": "offline"}, tmp_path, {}, enabled=True)
    assert seen["id"] == run_id, "a resumed run must reuse the W&B run id"
    assert wandb_logger.has_credentials() in (True, False)
    again.finish()


def test_disabled_or_not_rank0_never_imports_wandb(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import would fail
    assert WandbLogger({"mode": "disabled"}, tmp_path, {}, enabled=True).run is None
    assert WandbLogger({"mode": "online"}, tmp_path, {}, enabled=False).run is None
