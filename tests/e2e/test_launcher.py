"""The launcher end to end: 2 ranks with deepspeed (with/without --no_local_rank) and torchrun,
outputs in run.dir written by rank 0 only, and fail-fast errors for bad overrides."""

from __future__ import annotations

import pytest
import yaml

from tests.e2e.conftest import QUICK, launch, read_metrics

REQUIRED = {"step", "loss", "lr", "tokens_per_s", "step_time_s"}


def check_run_dir(run_dir, steps: int, method: str = "falqon"):
    assert (run_dir / "train.log").is_file()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run"]["dir"] == str(run_dir) and config["method"]["name"] == method
    metrics = read_metrics(run_dir)
    train = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train] == list(range(1, steps + 1))
    for m in train:
        assert REQUIRED <= m.keys(), m
        if method == "falqon":
            assert m["rows_merged"] > 0 and m["saturated"] >= 0
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, steps]
    assert all("eval_exact_match" in m for m in evals)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    # only rank 0 writes: no per-rank Hydra output, no second log
    assert not (run_dir / ".hydra").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "train.log"]
    return metrics


@pytest.mark.parametrize("kind", ["deepspeed", "deepspeed-no-local-rank", "torchrun"])
def test_two_ranks_zero3_falqon(kind, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(kind, [*QUICK, f"run.dir={run_dir}"])
    check_run_dir(run_dir, 4)
    assert "falqon_dist run summary" in proc.stdout and str(run_dir) in proc.stdout


def test_single_process_lora_zero0(tmp_path):
    run_dir = tmp_path / "run"
    launch("python", [*QUICK, f"run.dir={run_dir}", "method=lora", "deepspeed.zero_stage=0", "model.dtype=fp32"])
    check_run_dir(run_dir, 4, method="lora")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.micro_batch_size=0", "train.micro_batch_size must be a positive integer"),
        ("deepspeed.zero_stage=5", "deepspeed.zero_stage must be one of (0, 1, 2, 3)"),
        ("method=adapterx", "method"),
        ("train.nonexistent=1", "nonexistent"),
    ],
)
def test_bad_override_fails_before_work(override, message, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch("python", [override, f"run.dir={run_dir}"], check=False, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (run_dir / "metrics.jsonl").exists()
