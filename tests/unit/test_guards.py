"""The step watchdog, preemption, the run-directory lock and the resume check, without launching anything."""

from __future__ import annotations

import logging
import os
import signal
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from falqon_dist.train.divergence import DivergedError, StepWatch
from falqon_dist.train.preemption import Preempted, Preemption
from falqon_dist.train.run_dir import RunDirBusy, RunDirLock, check_resume
from falqon_dist.train.settings import ConfigError


def _train(**overrides):
    values = dict(
        max_nonfinite_steps=3, saturation_warn=0.01, saturation_abort=None, warmup_steps=0, lr=0.05
    )
    return SimpleNamespace(**{**values, **overrides})


def _record(loss=1.0, grad_norm=0.5, **merge):
    return {"loss": loss, "grad_norm": grad_norm, "lr": 0.05, **merge}


def test_non_finite_steps_stop_the_run_after_the_limit_and_a_good_step_resets_the_count():
    watch = StepWatch(_train())
    watch.check(1, _record(loss=float("nan")), last_checkpoint=lambda: None)
    assert watch.last_step_bad
    watch.check(2, _record(), last_checkpoint=lambda: None)
    assert not watch.last_step_bad  # one bad step is survivable
    watch.check(3, _record(nonfinite=12), last_checkpoint=lambda: None)
    watch.check(4, _record(grad_norm=float("inf")), last_checkpoint=lambda: None)
    with pytest.raises(
        DivergedError, match=r"step 5: 3 consecutive.*Last good checkpoint: /ckpt/step_2"
    ):
        watch.check(5, _record(loss=float("inf")), last_checkpoint=lambda: "/ckpt/step_2")


def test_saturation_is_warned_once_per_interval_and_can_stop_the_run(caplog):
    watch = StepWatch(_train())
    with caplog.at_level(logging.WARNING, logger="falqon_dist"):
        for step in range(1, 11):
            watch.check(step, _record(saturated=50, elements=1000), last_checkpoint=lambda: None)
    assert sum("clamped at ±448" in r.message for r in caplog.records) == 1
    strict = StepWatch(_train(saturation_abort=0.02))
    with pytest.raises(DivergedError, match="5.00% of the merged FP8 elements clamped"):
        strict.check(1, _record(saturated=50, elements=1000), last_checkpoint=lambda: None)


def test_stalls_are_warned(caplog):
    watch = StepWatch(_train())
    with caplog.at_level(logging.WARNING, logger="falqon_dist"):
        for step in range(1, 7):
            watch.check(
                step,
                _record(grad_norm=0.0, rows_merged=10, changed=0),
                last_checkpoint=lambda: None,
            )
    messages = [r.message for r in caplog.records]
    assert any("rounded away" in m for m in messages) and any(
        "gradient norm of exactly 0" in m for m in messages
    )
    hint = next(m for m in messages if "rounded away" in m)  # names keys that exist
    assert "method.merge=every_row" in hint and "method.merge_rounding=stochastic" in hint


def test_a_signal_becomes_a_stop_request_and_a_second_sigint_interrupts():
    preemption = Preemption()
    assert not preemption.requested
    preemption._request(signal.SIGTERM, None)
    assert preemption.requested and preemption.signum == signal.SIGTERM
    interrupted = Preemption()
    interrupted._request(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        interrupted._request(signal.SIGINT, None)
    assert "resume with train.resume=true" in str(Preempted(7, signal.SIGTERM))


def test_the_run_dir_lock_is_exclusive_and_taken_over_after_its_holder_is_gone(tmp_path, caplog):
    first = RunDirLock(tmp_path / "run")
    with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
        RunDirLock(tmp_path / "run")
    first._handle.close()  # the holder dies without releasing: the kernel drops its flock, the text stays
    with caplog.at_level(logging.WARNING, logger="falqon_dist"):
        second = RunDirLock(tmp_path / "run")
    assert any("taking over the lock" in r.message for r in caplog.records)
    second.release()
    assert (tmp_path / "run" / ".lock").read_text() == ""


def test_resume_check_names_every_incompatible_key_and_warns_about_the_rest(tmp_path):
    saved = {
        "method": {"name": "falqon", "rank": 16},
        "train": {"max_steps": 100, "lr": 0.05, "resume": False},
        "run": {"dir": str(tmp_path)},
    }
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "config.yaml")
    same = OmegaConf.create({**saved, "train": {**saved["train"], "resume": True}})
    assert check_resume(tmp_path, same, world_size=2, saved_world_size=2) == []
    longer = OmegaConf.create({**saved, "train": {"max_steps": 200, "lr": 0.05, "resume": True}})
    warnings = check_resume(tmp_path, longer, world_size=2, saved_world_size=2)
    assert "train.max_steps: 100 -> 200" in warnings and any(
        "schedule changes" in w for w in warnings
    )
    other = OmegaConf.create({**saved, "method": {"name": "falqon", "rank": 8}})
    with pytest.raises(ConfigError, match=r"method.rank: 16 -> 8.*number of ranks: 2 -> 4"):
        check_resume(tmp_path, other, world_size=4, saved_world_size=2)
    assert (
        check_resume(tmp_path, other, world_size=4, saved_world_size=None) == []
    )  # no checkpoint: fresh start
