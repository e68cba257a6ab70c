"""The benchmarks end to end on CPU: every row measured, the numbers that must hold do, reports written."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

from tests import processes

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(
        f"falqon_benchmarks_{name}", BENCHMARKS / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the merge


def test_merge_bench_compares_the_implementations_and_counts_their_traffic(tmp_path):
    payload = _load("bench_merge").main(["--quick", "--out", str(tmp_path)])
    merges = payload["merges"]
    assert set(merges) == {
        "untiled (as first written)",
        "tiled (torch)",
        "paper merge (top-r rows)",
    }  # no CUDA
    assert all(m["ms"] > 0 for m in merges.values()) and payload["host_syncs"] == 0
    parts = {p["part"]: p for p in payload["parts"]}
    untiled, tiled = parts["untiled: whole merge"], parts["tiled (torch), nearest: whole merge"]
    assert parts["untiled: update GEMM B·A_q"]["ops"] == 1 and untiled["bytes_per_element"] > 10
    # the quick shape fits one tile, so tiling changes nothing there: the same traffic within the ops'
    # bookkeeping, and the fp32 update (out x in) as the largest temporary in both
    assert tiled["largest_mib"] == pytest.approx(256 * 384 * 4 / 2**20)
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# falqon_dist merge benchmark") and "| tiled (torch) |" in text


# ---------------------------------------------------------------- one layer


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_layer")
    payload = _load("bench_layer").main(
        ["--quick", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--out", str(out)]
    )
    return out, payload


def test_layer_bench_measures_every_method(layer_run):
    out, payload = layer_run
    assert len(payload["shapes"]) == 2
    for block in payload["shapes"]:
        rows = {(r["method"], r["backend"]): r for r in block["methods"]}
        assert all("error" not in r for r in rows.values()), [r.get("error") for r in rows.values()]
        assert all(math.isfinite(r["median_ms"]) and r["median_ms"] > 0 for r in rows.values())
        falqon = rows[("falqon", "emulated")]
        assert falqon["casts"] == 3 and falqon["host_syncs"] == 0  # fwd + bwd + merge: no host sync
        paper = rows[("falqon, paper merge", "emulated")]
        assert (
            paper["casts"] == 3
            and paper["host_syncs"] == 0
            and paper["gemm_flops"] < falqon["gemm_flops"]
        )
        assert rows[("falqon, cached Wᵀ", "scaled_mm")]["host_syncs"] == 0
        assert (
            rows[("fp8_lora", "emulated")]["casts"] == 6 and rows[("peft LoRA", None)]["casts"] == 0
        )
        assert rows[("peft LoRA", None)]["x_lora"] == 1.0
        assert rows[("fp8_lora", "emulated")]["backbone_bytes_per_param"] == 1.0
        assert rows[("bf16 linear, frozen W", None)]["backbone_bytes_per_param"] == 2.0
        d_out = int(block["shape"].split("x")[1])
        # the melded A rows
        assert falqon["backbone_bytes_per_param"] == pytest.approx(1 + 16 / d_out)
        # the cached copy is built by the first backward and kept current by every merge: +1 byte/param
        assert rows[("falqon, cached Wᵀ", "scaled_mm")][
            "backbone_bytes_per_param"
        ] == pytest.approx(2 + 16 / d_out)
        parts = block["falqon_breakdown"]["parts_ms"]
        assert len(parts) == 9 and all(v > 0 for v in parts.values())
        assert {"merge (every row, carry)", "merge (paper: top-r rows)"} <= set(parts)
    assert payload["merge"]["host_syncs"] == 0 and payload["merge"]["layers"] == 4
    assert payload["cast"]["eager_ms"] > 0 and payload["cast"]["compiled_ms"] > 0
    text = (out / "results.md").read_text()
    assert text.startswith("# falqon_dist one-layer benchmark") and "| falqon | emulated |" in text
    assert json.loads((out / "results.json").read_text())["merge"]["layers"] == 4
    pytest.importorskip("matplotlib")
    assert (out / "results.png").stat().st_size > 1000


def test_layer_bench_flop_counts():
    bench = _load("bench_layer")
    n, i, o, r = 8, 32, 48, 4
    assert bench.gemm_flops("bf16 linear, frozen W", n, i, o, r) == 4 * n * i * o
    assert bench.gemm_flops("full", n, i, o, r) == 6 * n * i * o
    melded = 2 * n * i * (o + r) + 2 * n * o * i + 2 * n * o * r
    assert bench.gemm_flops("falqon, paper merge", n, i, o, r) == melded
    # the carry's forward term
    assert bench.gemm_flops("falqon", n, i, o, r) == melded + 2 * n * r * o
    assert bench.gemm_flops("peft LoRA", n, i, o, r) == 4 * n * i * o + 6 * n * r * (i + o)
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", "4096by4096"])


# ---------------------------------------------------------------- whole model, through the trainer


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_model")
    proc = processes.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_model.py"),
            "--quick",
            "--methods",
            "falqon",
            "lora",
            "--out",
            str(out),
        ],
        env=dict(os.environ),
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def test_model_bench_reads_the_trainers_own_metrics(model_run):
    out, payload, stdout = model_run
    rows = payload["methods"]
    for method in ("falqon", "lora"):
        row = rows[method]
        assert row["status"] == "ok", row
        # the trainer's own run dir
        assert row["steps"] == 6 and (out / method / "metrics.jsonl").exists()
        for key in (
            "step_time_ms",
            "tokens_per_s",
            "peak_mem_mb",
            "eval_loss_before",
            "eval_loss",
            "param_bytes_per_param",
        ):
            assert math.isfinite(row[key]) and row[key] > 0, (method, key, row[key])
        assert row["eval_loss"] < row["eval_loss_before"], row
    # B only vs A and B
    assert rows["falqon"]["trainable_params"] < rows["lora"]["trainable_params"]
    # FP8 vs bf16 backbone
    assert rows["falqon"]["param_bytes_per_param"] < rows["lora"]["param_bytes_per_param"]
    assert "deepspeed.zero_stage=2" in payload["config"]["set"]
    assert "| falqon |" in stdout and (out / "results.md").read_text().startswith(
        "# falqon_dist whole-model"
    )


def test_model_bench_arguments_and_metrics_reader(tmp_path):
    bench = _load("bench_model")
    args = bench.parse_args(
        ["--lr", "falqon=0.05", "--set", "deepspeed.zero_stage=3", "--out", str(tmp_path)]
    )
    assert args.lr_by_method == {"falqon": 0.05} and args.set == ["deepspeed.zero_stage=3"]
    command = bench.train_command(args, "falqon", None)
    assert (
        "method=falqon" in command
        and "train.lr=0.05" in command
        and f"run.dir={tmp_path / 'falqon'}" in command
    )
    for bad in (
        ["--lr", "nope=1"],
        ["--set", "novalue"],
        ["--shape", "custom", "--hidden", "64"],
        ["--steps", "3", "--warmup", "3"],
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"step": 0, "params": 100, "trainable_params": 10, "param_bytes": 150, "eval_loss": 5.0}
    ]
    lines += [
        {
            "step": s,
            "loss": 4.0 - s / 10,
            "step_time_s": 0.1 * s,
            "tokens_per_s": 100.0 * s,
            "mem_peak_mb": 10.0 + s,
        }
        for s in range(1, 7)
    ]
    lines += [{"step": 6, "eval_loss": 3.0, "eval_exact_match": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = bench.read_metrics(run, warmup=2)
    assert result["step_time_ms"] == pytest.approx(450.0)  # median of steps 3..6
    assert result["tokens_per_s"] == pytest.approx(450.0)
    assert result["peak_mem_mb"] == 16.0 and result["param_bytes_per_param"] == 1.5
    assert (result["eval_loss_before"], result["eval_loss"], result["exact_match"]) == (
        5.0,
        3.0,
        0.5,
    )


def test_model_bench_writes_a_loadable_shape_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bench = _load("bench_model")
    args = bench.parse_args(
        [
            "--shape",
            "custom",
            "--hidden",
            "64",
            "--intermediate",
            "128",
            "--layers",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    path, spec = bench.write_shape_model(args)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert (
        model.config.hidden_size == 64
        and model.config.num_hidden_layers == 1
        and spec["params"] > 0
    )
    assert len(AutoTokenizer.from_pretrained(path)) <= model.config.vocab_size


# ---------------------------------------------------------------- learning-rate sweep, through the trainer


def test_learning_bench_sweeps_variants_through_the_trainer(tmp_path):
    proc = processes.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_learning.py"),
            "--quick",
            "--variants",
            "lora",
            "falqon_keep",
            "falqon_all",
            "--lr-scale",
            "1",
            "--jobs",
            "2",
            "--time-rounds",
            "1",
            "--out",
            str(tmp_path),
        ],
        env=dict(os.environ),
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "results.json").read_text())
    runs = {r["variant"]: r for r in payload["runs"]}
    assert set(runs) == {"lora", "falqon_keep", "falqon_all"} and all(
        r["status"] == "ok" for r in runs.values()
    ), runs
    assert runs["lora"]["lr"] == 3e-3 and runs["falqon_keep"]["lr"] == 0.05
    for r in runs.values():
        assert (
            r["task"] == "demo"
            and math.isfinite(r["eval_loss"])
            and r["eval_loss"] < r["eval_loss_before"]
        )
    config = (tmp_path / "demo" / "falqon_all_lr0.125" / "config.yaml").read_text()
    assert "merge: every_row" in config and "carry_residual" not in config
    summary = payload["summary"]["demo"]
    assert summary["lora"]["x_best_lora"] == 1.0 and summary["falqon_keep"]["best_lr"] == 0.05
    checks = payload["acceptance"]["demo"]  # every FALQON variant but the paper's, at 1x only here
    assert set(checks) == {"falqon_keep", "falqon_all"}
    check = checks["falqon_all"]
    assert [c["scale"] for c in check] == [0.5, 1.0, 2.0, None] and check[1]["value"] == runs[
        "falqon_all"
    ]["exact_match"]
    assert check[0]["value"] is None  # not run: 0.5x
    # the step time comes from the separate, paired paper-vs-default steps
    timing = payload["timing"]["demo"]
    assert (
        timing["status"] == "ok"
        and len(timing["ratios"]) == 1
        and check[3]["value"] == timing["ratio"] > 0
    )
    steps = timing["step_time_ms"]
    assert len(steps["falqon_paper"]) == len(steps["falqon_all"]) == timing["steps"] == 6
    low, high = timing["quartiles"]
    assert low <= timing["ratio"] <= high and timing["ratio_of_medians"] > 0
    spec = json.loads((tmp_path / "demo" / "timing" / "round_0" / "spec.json").read_text())
    variants = spec["variants"]
    assert (
        "method.merge=every_row" in variants["falqon_all"]
        and "method.merge=paper" in variants["falqon_paper"]
    )
    text = (tmp_path / "results.md").read_text()
    assert (
        text.startswith("# falqon_dist learning benchmark") and "| falqon_all (default) |" in text
    )
    assert "measured apart from the sweep" in text


def test_learning_bench_arguments():
    bench = _load("bench_learning")
    args = bench.parse_args(
        ["--lr", "falqon_keep=0.05", "--lr-scale", "0.5", "2", "--out", "/tmp/unused"]
    )
    assert args.base_lr["falqon_keep"] == 0.05 and args.lr_scale == [0.5, 2.0]
    for bad in (
        ["--lr", "nope=1"],
        ["--lr-scale", "0"],
        ["--variants", "sgd"],
        ["--jobs", "0"],
        ["--tasks", "wiki"],
        ["--time-rounds", "-1"],
        ["--time-steps", "2"],
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


#: Each FALQON variant of the learning benchmark: (merge recipe, merge rounding, merge_every, lr).
LEARNING_VARIANTS = {
    "falqon_paper": ("paper", "nearest", 1, 0.1),
    "falqon_stochastic": ("paper", "stochastic", 1, 0.1),
    "falqon_keep": ("topk_keep", "nearest", 1, 0.05),
    "falqon_keep_sr": ("topk_keep", "stochastic", 1, 0.05),
    "falqon_carry": ("topk_carry", "nearest", 1, 0.1),
    "falqon_all": ("every_row", "nearest", 1, 0.125),
    "falqon_all_every2": ("every_row", "nearest", 2, 0.125),
    "falqon_all_every4": ("every_row", "nearest", 4, 0.125),
}


def test_learning_bench_variants_are_named_merge_recipes():
    """Every variant composes and validates as the trainer reads it, with the recipe it is named for
    (no old merge key: they would need the command-line migration)."""
    from hydra import compose, initialize_config_dir

    from falqon_dist.train.settings import validate

    bench = _load("bench_learning")
    assert set(bench.VARIANTS) == {"lora", *LEARNING_VARIANTS}
    for name, (merge, rounding, every, lr) in LEARNING_VARIANTS.items():
        overrides, base_lr = bench.VARIANTS[name]
        old_keys = ("method.unmerged", "method.carry_residual", "method.topk")
        assert not any(o.split("=")[0] in old_keys for o in overrides), name
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(
                config_name="config", overrides=["run.dir=/tmp/falqon-test-run", *overrides]
            )
        config = validate(cfg).method.config
        assert (config.merge, config.merge_rounding, config.merge_every, base_lr) == (
            merge,
            rounding,
            every,
            lr,
        ), name


def test_kjv_task_rows_split_each_verse_at_half_its_words():
    kjv = _load("make_kjv_task")
    verses = [
        ("Ge1:3", "And God said, Let there be light: and there was light."),
        ("Ge1:1", "Too short."),
        ("Joh11:35", "Jesus wept." * 20),
    ]
    rows = kjv.rows(verses, min_chars=20, max_chars=100)
    assert rows == [
        {"prompt": "Ge1:3 And God said, Let there", "response": " be light: and there was light."}
    ]
    assert kjv.VERSE.match("1Th2:12 That ye would walk")["ref"] == "1Th2:12"
