"""Resume continues from the saved step exactly; a crash's leftovers never corrupt it; W&B offline."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.e2e.conftest import QUICK, launch, read_metrics

# warm-up pinned: the resumed run (max_steps 4 -> 6) must see the uninterrupted run's schedule, and
# a warm-up of warmup_ratio x max_steps would differ between 4 and 6 steps (all 6 stay in warm-up)
STEPS = [
    "train.micro_batch_size=4",
    "train.eval_samples=16",
    "train.eval_generate_samples=0",
    "data.num_train=64",
    "data.num_eval=32",
    "train.warmup_steps=6",
]


def test_resume_continues_from_the_saved_step_like_an_uninterrupted_run(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    # stochastic merge rounding: the resumed merges must also draw the noise of their own steps (and the
    # rows of B a top-k merge kept must come back with the checkpoint)
    steps = [*STEPS, "method.merge=topk_keep", "method.merge_rounding=stochastic"]
    launch("deepspeed", [*steps, "train.max_steps=6", f"run.dir={full}"])

    launch("deepspeed", [*steps, "train.max_steps=4", "train.save_every=2", f"run.dir={resumed}"])
    # what a crash after step 4 leaves behind: a half-written step-6 checkpoint that `latest` does not
    # name, and metric lines of steps the crashed run did after its last checkpoint
    partial = resumed / "checkpoints" / "step_00000006"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    with open(resumed / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")

    proc = launch(
        "deepspeed", [*steps, "train.max_steps=6", "train.resume=true", f"run.dir={resumed}"]
    )
    assert "resumed from" in proc.stderr + proc.stdout and "at step 4" in proc.stderr + proc.stdout

    got = {m["step"]: m["loss"] for m in read_metrics(resumed) if "loss" in m}
    want = {m["step"]: m["loss"] for m in read_metrics(full) if "loss" in m}
    assert sorted(got) == [1, 2, 3, 4, 5, 6], got  # the stale step-5 line was dropped
    # same batches, same optimizer state, same RNG: the resumed steps match to float32 print precision
    for step in (5, 6):
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    kept = sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_00000004", "step_00000006"], kept  # keep_checkpoints=2


def test_qlora_resume_continues_like_an_uninterrupted_run(tmp_path):
    """The NF4 codes and their quant state (extra state-dict keys) round-trip through DeepSpeed's
    checkpoint; ZeRO-0 with bf16 keeps the fp32 masters in its own optimizer (ZeRO-2 is in test_launcher)."""
    pytest.importorskip("bitsandbytes")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    qlora = [*STEPS, "method=qlora", "deepspeed.zero_stage=0"]
    launch("deepspeed", [*qlora, "train.max_steps=6", f"run.dir={full}"])
    launch("deepspeed", [*qlora, "train.max_steps=4", f"run.dir={resumed}"])
    proc = launch(
        "deepspeed", [*qlora, "train.max_steps=6", "train.resume=true", f"run.dir={resumed}"]
    )
    assert "at step 4" in proc.stderr + proc.stdout
    got = {m["step"]: m["loss"] for m in read_metrics(resumed) if "loss" in m}
    want = {m["step"]: m["loss"] for m in read_metrics(full) if "loss" in m}
    assert sorted(got) == [1, 2, 3, 4, 5, 6], got
    for step in (5, 6):
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])


def test_resume_without_checkpoint_starts_from_zero(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(
        "python", [*QUICK, "train.max_steps=2", "train.resume=true", f"run.dir={run_dir}"]
    )
    assert "holds no checkpoint" in proc.stderr + proc.stdout
    assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == [1, 2]


def test_wandb_auto_mode_goes_offline_without_credentials_and_tensorboard_logs_beside_it(
    tmp_path, monkeypatch
):
    run_dir, home = tmp_path / "run", tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    launch(
        "python",
        [
            *QUICK,
            "train.max_steps=2",
            "logger=wandb_tensorboard",
            "wandb.mode=auto",
            f"run.dir={run_dir}",
        ],
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert [e.step for e in events.Scalars("eval_loss")] == [
        0,
        2,
    ] and "rows_merged" in events.Tags()["scalars"]
    metrics = {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}
    assert [round(e.value, 4) for e in events.Scalars("loss")] == [
        round(metrics[1], 4),
        round(metrics[2], 4),
    ]
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1, list((run_dir / "wandb").iterdir())
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert offline_runs[0].name.endswith(run_id)
    assert any(offline_runs[0].glob("*.wandb"))
    shutil.rmtree(run_dir / "wandb")


def test_cached_weight_transpose_trains_and_resumes_like_the_uncached_run(tmp_path):
    """method.cache_weight_transpose=true (ZeRO-2, 2 ranks): the cached Wᵀ feeds every ∂L/∂x GEMM, so a
    copy left stale by a merge (or by a resume's load) would change the gradients of every earlier
    layer and the losses from the next step on. Same losses as the uncached run, resume included."""
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    zero2 = [*STEPS, "deepspeed.zero_stage=2"]
    with_cache = [*zero2, "method.cache_weight_transpose=true"]
    launch("deepspeed", [*zero2, "train.max_steps=6", f"run.dir={plain}"])
    launch("deepspeed", [*with_cache, "train.max_steps=4", f"run.dir={cached}"])
    launch(
        "deepspeed", [*with_cache, "train.max_steps=6", "train.resume=true", f"run.dir={cached}"]
    )
    got = {m["step"]: m["loss"] for m in read_metrics(cached) if "loss" in m}
    want = {m["step"]: m["loss"] for m in read_metrics(plain) if "loss" in m}
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])
