"""How ``run()`` ends on a failure of one rank: one line that says what and where, the traceback in
a file (printed only with FALQON_DIST_DEBUG=1), exit code 1, and no wait for peers."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from falqon_dist.distributed import checkpoint
from falqon_dist.train import trainer

CONF = Path(__file__).resolve().parents[2] / "conf"


def _cfg(run_dir: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"run.dir={run_dir}", "logger=none", "deepspeed.zero_stage=0"],
        )


@pytest.mark.parametrize("debug", [False, True], ids=["quiet", "debug"])
def test_an_unexpected_failure_is_one_line_with_its_traceback_in_a_file(
    tmp_path, monkeypatch, capsys, debug
):
    def broken_setup(self):
        raise RuntimeError("the data server went away")

    monkeypatch.setattr(trainer.Trainer, "setup", broken_setup)
    waits: list[str] = []
    monkeypatch.setattr(trainer, "barrier", lambda what, *a, **k: waits.append(what))
    if debug:
        monkeypatch.setenv(trainer.DEBUG_ENV, "1")
    else:
        monkeypatch.delenv(trainer.DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        trainer.run(_cfg(tmp_path / "run"))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "falqon_dist: error:" in line]
    assert len(lines) == 1, err
    assert (
        "rank 0 failed: RuntimeError: the data server went away at " in lines[0]
        and "in broken_setup" in lines[0]
    )
    trace_file = tmp_path / "run" / "error_rank0.txt"
    assert f"traceback in {trace_file}" in lines[0]
    assert (
        "Traceback (most recent call last)" in trace_file.read_text()
        and "broken_setup" in trace_file.read_text()
    )
    assert ("Traceback (most recent call last)" in err) == debug
    assert (tmp_path / "run" / ".lock").read_text() == ""  # the run directory's lock was released
    # no wait for peers after the failure
    assert not any(w.startswith("finish the run") for w in waits), waits


def test_a_checkpoint_write_failure_of_this_rank_leaves_without_waiting(
    tmp_path, monkeypatch, capsys
):
    def failing_setup(self):
        raise checkpoint.CheckpointWriteError(
            "rank 0 could not write checkpoint step_00000002 to X (the disk filled up)"
        )

    monkeypatch.setattr(trainer.Trainer, "setup", failing_setup)
    waits: list[str] = []
    monkeypatch.setattr(trainer, "barrier", lambda what, *a, **k: waits.append(what))
    with pytest.raises(SystemExit) as exit_:
        trainer.run(_cfg(tmp_path / "run"))
    assert exit_.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "falqon_dist: error:" in line]
    assert len(lines) == 1 and "the disk filled up" in lines[0]
    assert not any(w.startswith("finish the run") for w in waits), waits


def test_the_progress_line_gives_step_total_rate_and_eta(monkeypatch):
    from falqon_dist.train import logging_utils

    now = [100.0]
    monkeypatch.setattr(logging_utils.time, "monotonic", lambda: now[0])
    clock = logging_utils.ProgressClock(total=300, initial=100)  # resumed at step 100
    assert clock.describe(100) == "step 100/300 (33%)"
    now[0] += 20.0  # 10 steps in 20 s
    assert clock.describe(110) == "step 110/300 (36%), 2.00 s/step, eta 0:06:20"


def test_a_step_that_failed_on_ranks_is_said_once():
    """The same error on every rank is that error; different ones, or some ranks only, name the ranks."""
    same = {0: "a.jsonl: line 2: bad", 1: "a.jsonl: line 2: bad"}
    assert trainer.ranks_failure(same, 2, "the data") == "a.jsonl: line 2: bad"
    assert trainer.ranks_failure({1: "no such file: a.jsonl"}, 2, "the data") == (
        "the data failed on 1 of 2 ranks: rank 1: no such file: a.jsonl"
    )
    assert (
        trainer.ranks_failure({0: "x", 1: "y"}, 2, "the data")
        == "the data failed on 2 of 2 ranks: rank 0: x; rank 1: y"
    )


def test_errors_of_every_rank_without_a_group_is_this_ranks():
    from falqon_dist.distributed.waits import errors_of_every_rank

    assert errors_of_every_rank(None, "load the data") == {}
    assert errors_of_every_rank("bad row", "load the data") == {0: "bad row"}
