"""FP8 export and eval from the command line, on a run trained on 2 ranks under ZeRO-3 (bf16).

One training run (deepspeed launcher, 2 ranks, ZeRO-3, the embedded default, export.enabled=true) is
shared by every test. The checks:

* ``export.enabled=true`` leaves RUN_DIR/export, loadable by transformers (W8A8 and dequantized);
* ``python launch/export.py run.dir=…`` (ONE process) writes FP8 codes bit-identical to the
  checkpoint's per-rank fragments (read here straight from the ``zero_pp_rank_*`` files), and the same
  files as the 2-rank in-training export;
* the export loaded with ``CompressedTensorsConfig(dequantize=True)`` in fp32 gives the logits of a
  dequantized reference built from the checkpoint (same fp32 weights, same graph: float noise only);
* ``launch/eval.py`` on the run dir (FALQON's FP8 forward) and on the export (dequantized) agree;
* clear errors for a missing run dir / config.yaml / checkpoint, a non-FALQON run, an existing out.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from falqon_dist.distributed.safe_load import load_file
from tests import processes
from tests.e2e.conftest import MODEL_CACHE, QUICK, REPO, launch, read_metrics
from tests.unit.test_export import read_tensors

pytest.importorskip("compressed_tensors")

# transformers notes that the export's own quantization_config is used (we only pass dequantize=True)
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

EXPORT = REPO / "launch" / "export.py"
EVAL = REPO / "launch" / "eval.py"
STEPS = 3

#: Export loaded with dequantize=True in fp32 vs the fp32 dequantized reference: the weights are
#: bit-identical (fp8 → fp32 × scale both ways), the graph is the same → float noise only (measured 0).
LOGITS_ATOL = 1e-4
#: launch/eval.py on the run dir (activations quantized to E4M3 by FALQON's forward) vs on the export
#: (dequantized weights, bf16 activations): same weights, different activation rounding. Measured
#: ~0.1% relative on this model; 5% leaves room across seeds and backends.
EVAL_LOSS_RTOL = 0.05
#: The trainer's final eval loss (B folded into the FP8 bytes, 2 ranks, activations in E4M3) vs
#: launch/eval.py on the export (one process, dequantized, bf16 activations): the same weights, the
#: activation rounding differs. Measured 0.04% and 0.14% (40 steps) and 0.36% (this 3-step run, after
#: the loss became token-normalized). The bytes themselves are compared exactly elsewhere
#: (tests/distributed/worker_export.py, tests/unit/test_export.py); this bounds the forwards' gap.
SHIPPED_RTOL = 0.006


def _env() -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "FALQON_CACHE": MODEL_CACHE,
    }
    env.pop("WORLD_SIZE", None)
    return env


def run_cli(script: Path, args: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    proc = processes.run([sys.executable, str(script), *args], cwd=REPO, env=_env(), timeout=300)
    if check:
        output = (proc.stdout + proc.stderr)[-4000:]
        assert proc.returncode == 0, f"{script.name} {args} exited {proc.returncode}\n{output}"
    return proc


def cli_module(script: Path):
    """launch/<script>.py imported as a module (its ``main(argv)`` runs in-process)."""
    spec = importlib.util.spec_from_file_location(f"falqon_cli_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkpoint_tensors(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(full frozen parameters, buffers) read directly from a ZeRO-3 checkpoint's per-rank files."""
    files = sorted(
        ckpt.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"),
        key=lambda p: int(p.name.split("_")[3]),
    )
    assert len(files) == 2, files
    states = [load_file(f) for f in files]  # our checkpoints need no pickle
    full = {}
    for name, shape in states[0]["frozen_param_shapes"].items():
        parts = [s["frozen_param_fragments"][name] for s in states]
        full[name] = torch.cat(parts).narrow(0, 0, shape.numel()).view(shape)
    buffers = {k: v for k, v in states[0]["module"].items() if k in states[0]["buffer_names"]}
    return full, buffers


def load_export(directory: Path, **kwargs) -> nn.Module:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    quant = (
        {"quantization_config": CompressedTensorsConfig(dequantize=True)}
        if kwargs.pop("dequantize", False)
        else {}
    )
    return AutoModelForCausalLM.from_pretrained(directory, **quant, **kwargs).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export_cli") / "run"
    launch(
        "deepspeed", [*QUICK, f"train.max_steps={STEPS}", "export.enabled=true", f"run.dir={run}"]
    )
    return run


@pytest.fixture(scope="module")
def cli_export(run_dir) -> tuple[Path, str]:
    out = run_dir.parent / "cli_export"
    proc = run_cli(EXPORT, [f"run.dir={run_dir}", f"out={out}"])
    return out, proc.stdout


# ------------------------------------------------------------------------------------------- export
def test_training_with_export_enabled_leaves_a_loadable_export(run_dir):
    export = run_dir / "export"
    modes = {path.name: path.stat().st_mode & 0o777 for path in export.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights are as readable as config.json
    config = json.loads((export / "config.json").read_text())
    assert config["quantization_config"]["format"] == "float-quantized"
    info = json.loads((export / "falqon_run.json").read_text())  # as launch/export.py writes it
    assert (info["tag"], info["step"], info["run_dir"]) == (
        f"step_{STEPS:08d}",
        STEPS,
        str(run_dir),
    )
    assert info["config"]["train"]["max_steps"] == STEPS
    tokens = torch.tensor([[1, 5, 9, 13, 17, 21]])
    for kwargs in ({}, {"dequantize": True}):  # compressed-tensors W8A8 forward, and float weights
        model = load_export(export, **kwargs)
        with torch.no_grad():
            logits = model(tokens).logits
        assert logits.shape == (1, 6, config["vocab_size"]) and torch.isfinite(logits).all(), kwargs


def test_cli_export_writes_the_checkpoint_fp8_bytes(run_dir, cli_export):
    """The checkpoint's FP8 codes with what B still holds folded in by the same fold the trainer ran
    after its last step (the checkpoint is the exact training state, saved before the fold), nothing
    requantized; the in-training export (of the folded model) holds the same bytes."""
    import falqon_dist as fd
    from falqon_dist.export.exporter import merge_pending_proxies_
    from falqon_dist.train.restore import restore_run

    out, stdout = cli_export
    ckpt = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    frozen, buffers = checkpoint_tensors(ckpt)
    exported = read_tensors(out)
    qweights = {k[: -len(".qweight")]: v for k, v in frozen.items() if k.endswith(".qweight")}
    assert len(qweights) == 28  # 4 layers × (q, k, v, o, gate, up, down)
    restored = restore_run(run_dir)
    for name, layer in fd.falqon_layers(restored.model):
        assert torch.equal(layer.qweight, qweights[name]), (
            f"{name}: restored bytes differ from the checkpoint"
        )
    # the carry, not yet folded
    assert any(layer.B.any() for _, layer in fd.falqon_layers(restored.model))
    assert merge_pending_proxies_(restored.model)
    merged = {name: layer.qweight for name, layer in fd.falqon_layers(restored.model)}
    for layer, codes in qweights.items():
        weight = exported[f"{layer}.weight"]
        assert weight.dtype == torch.float8_e4m3fn
        out_features = weight.shape[0]
        assert codes.shape[0] > out_features  # the melded A rows are dropped from the export
        assert torch.equal(weight.view(torch.uint8), merged[layer][:out_features]), (
            f"{layer}: FP8 bytes differ"
        )
        scale = exported[f"{layer}.weight_scale"]
        assert scale.dtype == torch.float32 and torch.equal(scale, buffers[f"{layer}.scale"]), layer
    for name, tensor in frozen.items():  # embeddings, norms, lm_head: unchanged, in the run's dtype
        if not name.endswith(".qweight"):
            assert tensor.dtype == torch.bfloat16 and torch.equal(exported[name], tensor), name
    assert set(exported) == {f"{k}.weight" for k in qweights} | {
        f"{k}.weight_scale" for k in qweights
    } | {k for k in frozen if not k.endswith(".qweight")}

    # the 2-rank in-training export (ZeRO-3 gathers) and the 1-process CLI export are the same files
    in_training = run_dir / "export"
    assert {
        k: v.view(torch.uint8) for k, v in read_tensors(in_training).items()
    }.keys() == exported.keys()
    for key, tensor in read_tensors(in_training).items():
        assert torch.equal(tensor.view(torch.uint8), exported[key].view(torch.uint8)), key
    assert json.loads((in_training / "config.json").read_text()) == json.loads(
        (out / "config.json").read_text()
    )

    info = json.loads((out / "falqon_run.json").read_text())
    assert (
        info["tag"] == f"step_{STEPS:08d}"
        and info["step"] == STEPS
        and info["config"]["method"]["name"] == "falqon"
    )
    assert (
        str(out) in stdout
        and "FP8 tensors     28" in stdout
        and " MB" in stdout
        and "time" in stdout
    )


def test_exported_logits_match_the_dequantized_checkpoint(run_dir, cli_export):
    import falqon_dist as fd
    from falqon_dist.export.exporter import merge_pending_proxies_
    from falqon_dist.train.restore import restore_run

    out, _ = cli_export
    restored = restore_run(run_dir)
    # what the export does with what B still holds (the carry)
    merge_pending_proxies_(restored.model)
    reference = copy.deepcopy(restored.model).float()
    for name, layer in fd.falqon_layers(reference):
        parent, _, child = name.rpartition(".")
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight.data = layer.backbone_weight()  # fp8 codes × scale, fp32
        setattr(reference.get_submodule(parent), child, linear)
    loaded = load_export(out, dequantize=True, dtype=torch.float32)
    for name, layer in fd.falqon_layers(restored.model):
        assert torch.equal(loaded.get_submodule(name).weight, layer.backbone_weight()), name
    tokens = torch.randint(
        3, reference.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want, got = reference(tokens).logits, loaded(tokens).logits
    diff = (want - got).abs().max().item()
    print(
        f"max |logits(export, dequantized fp32) - logits(reference from checkpoint)| = {diff:.3g}"
    )
    assert diff <= LOGITS_ATOL, diff


def test_cli_export_of_a_replicated_zero2_checkpoint(tmp_path):
    """ZeRO-0/1/2 checkpoints hold the whole module in mp_rank_00_model_states.pt: same export. The
    run trained on a JSONL file with a DeepSpeed JSON; both are gone when it is exported (export
    reads neither: it used to fail with ``data.path=...: no such file``)."""
    run, data, ds_json = tmp_path / "run", tmp_path / "train.jsonl", tmp_path / "ds.json"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"add {i} and {i + 1}", "response": str(2 * i + 1)}) + "\n"
            for i in range(96)
        )
    )
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False}}))
    quick = [arg for arg in QUICK if not arg.startswith("data.")]  # the synthetic task's sizes
    launch(
        "python",
        [
            *quick,
            "train.max_steps=2",
            "train.eval_samples=0",
            "train.eval_generate_samples=0",
            "data=jsonl",
            f"data.path={data}",
            f"deepspeed.config={ds_json}",
            "method.exclude_modules=[down_proj]",
            "deepspeed.zero_stage=2",
            "export.enabled=true",
            f"run.dir={run}",
        ],
    )
    assert (run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt").is_file()
    data.unlink()
    ds_json.unlink()
    run_cli(EXPORT, [f"run.dir={run}", "tag=2", f"out={tmp_path / 'cli'}"])
    want, got = read_tensors(run / "export"), read_tensors(tmp_path / "cli")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key].view(torch.uint8), got[key].view(torch.uint8)), key
    # method.exclude_modules kept every down_proj out of FALQON, in training and in the restore
    assert want["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.0.mlp.down_proj.weight_scale" not in want
    assert want["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    # eval does read the data: its absence is one clear line naming the file, not a traceback
    proc = run_cli(EVAL, [f"path={run}"], check=False)
    assert proc.returncode == 2 and str(data) in proc.stderr and "Traceback" not in proc.stderr, (
        proc.stderr[-3000:]
    )


# --------------------------------------------------------------------------------------------- eval
def test_eval_of_run_dir_and_export_agree(run_dir, cli_export, tmp_path):
    out, _ = cli_export
    args = ["samples=16", "generate=8"]
    groups = {
        kind: processes.ProcessGroup(
            [sys.executable, str(EVAL), f"path={path}", *args, f"json={tmp_path / kind}.json"],
            cwd=REPO,
            env=_env(),
        )
        for kind, path in (("run", run_dir), ("export", out))
    }
    results = {}
    try:
        for kind, group in groups.items():
            proc = group.wait(timeout=300)
            output = proc.stdout + proc.stderr
            assert proc.returncode == 0, f"eval {kind} exited {proc.returncode}\n{output[-4000:]}"
            assert (
                "eval loss" in proc.stdout
                and "perplexity" in proc.stdout
                and "exact match" in proc.stdout
            ), output
            results[kind] = json.loads((tmp_path / f"{kind}.json").read_text())
    finally:
        for group in groups.values():
            group.kill()
    run, export = results["run"], results["export"]
    assert run["kind"] == "run" and run["tag"] == f"step_{STEPS:08d}"
    assert export["kind"] == "export" and export["config_source"].endswith("falqon_run.json")
    assert run["eval_samples"] == export["eval_samples"] == 16
    assert 0.0 <= run["exact_match"] <= 1.0 and 0.0 <= export["exact_match"] <= 1.0
    relative = abs(run["eval_loss"] - export["eval_loss"]) / run["eval_loss"]
    print(
        f"eval loss: run dir {run['eval_loss']:.4f}, export {export['eval_loss']:.4f} ({relative:.2%})"
    )
    assert relative <= EVAL_LOSS_RTOL, (run, export)
    # what ships is what was trained: the trainer's final eval is of the folded model the export holds
    final = read_metrics(run_dir)[-1]
    shipped = abs(final["eval_loss"] - export["eval_loss"]) / final["eval_loss"]
    print(
        f"trainer's final eval {final['eval_loss']:.4f} (before folding B: {final['before_fold/eval_loss']:.4f}), "
        f"export {export['eval_loss']:.4f} ({shipped:.2%})"
    )
    assert shipped <= SHIPPED_RTOL, (final, export)


# ------------------------------------------------------------------------------------------- errors
def test_cli_errors_name_the_path_or_key(run_dir, tmp_path, capsys):
    proc = run_cli(EXPORT, [f"run.dir={tmp_path / 'missing'}"], check=False)
    assert (
        proc.returncode == 2 and "no such run directory" in proc.stderr and "missing" in proc.stderr
    )

    export_cli, eval_cli = cli_module(EXPORT), cli_module(EVAL)

    def fails(module, argv: list[str], *needles: str) -> None:
        assert module.main(argv) == 2, argv
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, (needle, err)

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(export_cli, [f"run.dir={empty}"], str(empty / "config.yaml"))
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(run_dir / "config.yaml", no_ckpt / "config.yaml")
    fails(export_cli, [f"run.dir={no_ckpt}"], str(no_ckpt / "checkpoints"))
    (no_ckpt / "checkpoints").mkdir()
    fails(export_cli, [f"run.dir={no_ckpt}"], "latest")
    lora = tmp_path / "lora"
    lora.mkdir()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["method"] = {
        "name": "lora",
        "rank": 16,
        "alpha": None,
        "dropout": 0.0,
        "lr": 0.003,
        "target_modules": None,
        "exclude_modules": None,
    }  # what a LoRA run saves
    (lora / "config.yaml").write_text(yaml.safe_dump(config))
    fails(export_cli, [f"run.dir={lora}"], "method.name='lora'", "method=falqon")
    fails(
        export_cli,
        [f"run.dir={run_dir}", "tag=step_00000099", f"out={tmp_path / 'o'}"],
        "step_00000099",
        f"step_{STEPS:08d}",
    )
    # training's export
    fails(export_cli, [f"run.dir={run_dir}"], str(run_dir / "export"), "overwrite")
    fails(export_cli, [f"run.dir={run_dir}", "outt=x"], "unknown key 'outt'")
    fails(export_cli, [], "run.dir=... is required")
    fails(eval_cli, [f"path={empty}"], "neither a run directory", str(empty))
