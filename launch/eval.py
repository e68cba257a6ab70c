#!/usr/bin/env python
"""Evaluate a FALQON run directory or an FP8 export on the run's eval split (one plain process).

    python launch/eval.py path=RUN_DIR_OR_EXPORT_DIR [samples=128] [generate=64] [batch_size=N]
                          [tag=latest] [config=RUN_DIR/config.yaml] [dequantize=true] [json=FILE]

Prints the eval loss over response tokens (and its perplexity) of the first ``samples`` eval
sequences and, for data=synthetic, the greedy exact match of the first ``generate`` prompts:

* a run directory (holds ``config.yaml`` and ``checkpoints/``): checkpoint ``tag`` is restored with
  FALQON's own forward (activations quantized to FP8, the run's fp8.backend), exactly as training
  evaluated it;
* an export directory (``config.json`` with a compressed-tensors ``quantization_config``): loaded with
  transformers + compressed-tensors, by default ``CompressedTensorsConfig(dequantize=True)`` (float
  weights = fp8 × scale, float activations); ``dequantize=false`` keeps compressed-tensors'
  quantized forward (FP8 weights, per-token FP8 activations as the config declares).

The data of an export comes from, in order: ``config=`` (a run's config.yaml), the export's
``falqon_run.json`` (written by launch/export.py), ``../config.yaml`` (an export made by training
with export.enabled=true lives in RUN_DIR/export), else the shipped default (data=synthetic).
``batch_size`` defaults to the run's train.micro_batch_size (the batch size training evaluated with).
``json=FILE`` also writes the results as JSON. Every key is documented in ``conf/eval.yaml``;
overrides follow Hydra's grammar, as for launch/train.py.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from falqon_dist.train.cli import boolean, compose_cli, non_negative_int, optional_str  # noqa: E402
from falqon_dist.train.saved_config import RestoreError  # noqa: E402


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``argv`` as overrides of conf/eval.yaml (every key documented there)."""
    cfg = compose_cli("eval", argv, "launch/eval.py")
    return {
        "path": str(cfg.path),
        "samples": non_negative_int(cfg.samples, "samples"),
        "generate": non_negative_int(cfg.generate, "generate"),
        "batch_size": non_negative_int(cfg.batch_size, "batch_size", allow_none=True),
        "tag": str(cfg.tag),
        "config": optional_str(cfg.config, "config"),
        "dequantize": boolean(cfg.dequantize, "dequantize"),
        "json": optional_str(cfg.json, "json"),
    }


def _is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def _is_export_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "quantization_config" in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False


def _settings_from(cfg, where: str):
    from falqon_dist.train.saved_config import validate_saved_config

    return validate_saved_config(cfg, where)


def export_settings(export_dir: Path, config: str | None):
    """The run settings (data, batch size) for an export; returns (settings, where they came from).

    Every saved config (``config=``, the export's ``falqon_run.json``, ``../config.yaml``) is read with
    :func:`~falqon_dist.train.saved_config.read_saved_config`: never resolved here, and refused naming
    the file and key if a string still holds ``${`` (it would run this machine's resolvers, e.g. read
    its environment). Only the shipped default, this checkout's own config, is composed and resolved.
    """
    from omegaconf import OmegaConf

    from falqon_dist.export.run_info import RUN_INFO, read_run_info
    from falqon_dist.train.saved_config import read_saved_config

    if config is not None:
        path = Path(config).expanduser()
        if path.is_dir():
            path = path / "config.yaml"
        if not path.is_file():
            raise RestoreError(f"config={config!r}: no such file (a run's config.yaml)")
        return _settings_from(read_saved_config(path), str(path)), str(path)
    try:
        info = read_run_info(export_dir)
    except ValueError as error:
        raise RestoreError(str(error)) from None
    if info is not None:
        where = str(export_dir / RUN_INFO)
        return _settings_from(read_saved_config(info["config"], where), where), where
    parent = export_dir.parent / "config.yaml"
    if parent.is_file():
        return _settings_from(read_saved_config(parent), str(parent)), str(parent)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"run.dir={export_dir}"])
    # our own config: resolved as training does
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    origin = "the shipped default conf/config.yaml (no run config found)"
    return _settings_from(resolved, "conf/config.yaml"), origin


def load_export(export_dir: Path, dequantize: bool):
    """The export loaded with transformers + compressed-tensors (its own tokenizer if it has one)."""
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():  # "quantization_config from the model will be used" (intended)
        warnings.simplefilter("ignore", UserWarning)
        model = AutoModelForCausalLM.from_pretrained(
            export_dir,
            quantization_config=CompressedTensorsConfig(dequantize=dequantize),
            trust_remote_code=False,
        )
    return model.eval()


def evaluate(args: dict[str, Any]) -> dict[str, Any]:
    import logging

    import torch

    from falqon_dist.data import build_data
    from falqon_dist.train.evaluate import eval_losses, greedy_exact_match
    from falqon_dist.train.model_setup import load_tokenizer, resolve_model_path
    from falqon_dist.train.restore import restore_run

    logging.getLogger("falqon_dist").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(args["path"]).expanduser().resolve()
    if not path.exists():
        raise RestoreError(f"path={args['path']!r}: no such directory")
    start = time.perf_counter()
    result: dict[str, Any] = {"path": str(path)}
    if _is_run_dir(path):
        restored = restore_run(path, args["tag"])
        model, tokenizer, settings = restored.model, restored.tokenizer, restored.settings
        result.update(
            kind="run",
            tag=restored.tag,
            step=restored.step,
            config_source=str(path / "config.yaml"),
            forward=f"FALQON FP8 (fp8.backend={settings.fp8.backend}, model.dtype={settings.model.dtype})",
        )
    elif _is_export_dir(path):
        settings, source = export_settings(path, args["config"])
        model = load_export(path, args["dequantize"])
        has_tokenizer = (path / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(
            str(path) if has_tokenizer else resolve_model_path(settings),
            settings.model.trust_remote_code,
        )
        forward = (
            "dequantized weights (fp8 x scale)"
            if args["dequantize"]
            else "compressed-tensors FP8 forward"
        )
        result.update(
            kind="export", config_source=source, forward=f"transformers, {forward}, {model.dtype}"
        )
    else:
        raise RestoreError(
            f"path={str(path)!r} is neither a run directory (config.yaml + checkpoints/) nor an FP8 export "
            "(config.json with a quantization_config)"
        )
    try:
        data = build_data(settings.data, tokenizer)
    except FileNotFoundError as error:
        source = result.get("config_source", path)
        raise RestoreError(
            f"{error}: eval reads the run's eval split from its training data "
            f"(data={settings.data.name} in {source}); restore that file"
        ) from None
    batch_size = args["batch_size"] or settings.train.micro_batch_size
    samples = min(args["samples"], len(data.eval))
    result.update(data=settings.data.name, eval_samples=samples)
    with torch.no_grad():  # data=mix: each source's loss too, from the same forward passes
        loss, by_source = eval_losses(model, data, samples, batch_size) if samples else (None, {})
    result["eval_loss"] = loss
    if data.mixture:
        result["eval_loss_by_source"] = by_source
    result["perplexity"] = math.exp(loss) if loss is not None and loss < 700 else None
    generate = min(args["generate"], len(data.eval_records))
    if settings.data.name == "synthetic" and generate:
        result["exact_match"] = greedy_exact_match(
            model, tokenizer, data.eval_records, generate, batch_size=64
        )
        result["generate_samples"] = generate
    result["seconds"] = time.perf_counter() - start
    return result


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        args = parse_args(argv)
        result = evaluate(args)
    except (RestoreError, ValueError) as error:
        print(f"launch/eval.py: error: {error}", file=sys.stderr)
        return 2
    what = f"run directory, checkpoint {result['tag']}" if result["kind"] == "run" else "FP8 export"
    lines = [
        "=" * 64,
        f" falqon_dist eval ({what})",
        "-" * 64,
        f" path            {result['path']}",
        f" forward         {result['forward']}",
        f" config          {result['config_source']}",
        f" data            {result['data']}: {result['eval_samples']} eval sequences",
        f" eval loss       {_fmt(result['eval_loss'])}",
        *(
            f"   {name:<13} {_fmt(value)}"
            for name, value in result.get("eval_loss_by_source", {}).items()
        ),
        f" perplexity      {_fmt(result['perplexity'], '.3f')}",
    ]
    if "exact_match" in result:
        lines.append(
            f" exact match     {result['exact_match']:.4f} ({result['generate_samples']} prompts)"
        )
    lines += [f" time            {result['seconds']:.1f} s", "=" * 64]
    print("\n".join(lines), flush=True)
    if args["json"]:
        Path(args["json"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
