"""launch/bench.py end to end on CPU: ``--quick`` writes the JSON, markdown and PNG with finite numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "launch" / "bench.py"
TRAINED = ("falqon", "lora", "fp8_lora", "full")
NUMERIC_FIELDS = (
    "step_time_ms", "tokens_per_s", "peak_mem_mb", "load_peak_mem_mb", "backbone_bytes_per_param",
    "eval_loss_before", "eval_loss", "train_loss_first", "train_loss_last",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, dict, str]:
    """One ``--quick`` run shared by the tests of this module: (out dir, results.json, stdout)."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def test_writes_reports(quick_run):
    out, payload, stdout = quick_run
    assert (out / "results.md").read_text().startswith("# falqon_dist benchmark")
    pytest.importorskip("matplotlib")
    assert (out / "results.png").stat().st_size > 1000
    assert "| falqon |" in stdout


def test_every_method_has_finite_numbers(quick_run):
    _, payload, _ = quick_run
    rows = {row["method"]: row for row in payload["methods"]}
    assert set(rows) == {*TRAINED, "qlora"}
    for method in TRAINED:
        row = rows[method]
        assert row["status"] == "ok", row
        for field in NUMERIC_FIELDS:
            assert math.isfinite(row[field]), (method, field, row[field])
        assert row["step_time_ms"] > 0 and row["tokens_per_s"] > 0
        assert row["quantize_ops_per_step"] == row["quantize_ops_measured"], row
    # qlora runs wherever bitsandbytes imports (CPU included); without it, it is skipped with the reason.
    qlora = rows["qlora"]
    if not _bitsandbytes_imports():
        assert qlora["status"] == "skipped" and "bitsandbytes" in qlora["reason"], qlora
        return
    assert qlora["status"] == "ok", qlora
    for field in NUMERIC_FIELDS:
        assert math.isfinite(qlora[field]), ("qlora", field, qlora[field])
    assert qlora["adapted_layers"] == rows["lora"]["adapted_layers"]
    assert qlora["trainable_params"] == rows["lora"]["trainable_params"]
    # NF4 codes (0.5 B) + block scales + the two 16/256-entry code books, which weigh a lot at these
    # 64-wide shapes (0.70 measured); well under fp8_lora's 1 byte either way
    assert 0.5 < qlora["backbone_bytes_per_param"] < 1.0
    assert qlora["quantize_ops_measured"] > 0  # 4-bit dequantizations were seen


def test_method_specific_numbers(quick_run):
    _, payload, _ = quick_run
    rows = {row["method"]: row for row in payload["methods"]}
    rank, hidden = payload["config"]["rank"], payload["model"]["hidden"]
    layers = rows["falqon"]["adapted_layers"]
    assert rows["falqon"]["quantize_ops_per_step"] == 3 * layers
    assert rows["fp8_lora"]["quantize_ops_per_step"] == 6 * layers
    assert rows["lora"]["quantize_ops_per_step"] == rows["full"]["quantize_ops_per_step"] == 0
    assert rows["fp8_lora"]["backbone_bytes_per_param"] == 1.0
    # melded rows: 1 + r/out per layer, so between 1 + r/max(out) and 1 + r/min(out)
    assert 1.0 < rows["falqon"]["backbone_bytes_per_param"] <= 1.0 + rank / hidden
    assert rows["lora"]["backbone_bytes_per_param"] == 4.0  # fp32 on CPU by default
    assert rows["falqon"]["lr"] == 0.1 and rows["lora"]["lr"] == 3e-3
    assert payload["gemm"] == []  # CUDA only
    assert payload["zero3"]["status"] == "n/a"


def _bitsandbytes_imports() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # missing, or a broken native library: the benchmark skips qlora
        return False
    return True


def _load_bench():
    spec = importlib.util.spec_from_file_location("falqon_launch_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lr_override_and_validation():
    bench = _load_bench()
    args = bench.parse_args(["--quick", "--lr", "falqon=0.05", "--out", "/tmp/unused"])
    assert args.lr_by_method["falqon"] == 0.05 and args.lr_by_method["full"] == 1e-3
    assert args.shape == "custom" and args.train_steps > args.warmup
    args = bench.parse_args(["--quick", "--train-steps", "9", "--out", "/tmp/unused"])
    assert args.train_steps == 9  # an explicit flag beats the --quick default
    with pytest.raises(SystemExit):
        bench.parse_args(["--lr", "nope=1"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--shape", "custom", "--hidden", "64"])
    spec = bench.model_spec(bench.parse_args(["--shape", "llama-7b", "--layers", "2", "--out", "/tmp/unused"]))
    assert (spec["hidden"], spec["intermediate"], spec["heads"], spec["layers"]) == (4096, 11008, 32, 2)


def test_qlora_skip_reasons(monkeypatch):
    import torch

    import falqon_dist.baselines.qlora as qlora

    bench = _load_bench()
    cpu = torch.device("cpu")
    bench.check_runnable("lora", cpu)  # the other methods always run
    if _bitsandbytes_imports():
        bench.check_runnable("qlora", cpu)  # CPU is fine now

    def broken():
        raise ImportError("method=qlora needs bitsandbytes, which does not import here (OSError: libfoo)")

    monkeypatch.setattr(qlora, "import_bitsandbytes", broken)
    if importlib.util.find_spec("bitsandbytes") is not None:
        with pytest.raises(bench.SkipMethod, match="does not import here"):
            bench.check_runnable("qlora", cpu)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec now reports it missing
    with pytest.raises(bench.SkipMethod, match=r"bitsandbytes is not installed \(pip install -e \.\[qlora\]\)"):
        bench.check_runnable("qlora", cpu, try_import=False)
