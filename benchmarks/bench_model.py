#!/usr/bin/env python
"""Whole model, every fine-tuning method side by side, through the REAL trainer (``launch/train.py``).

    python benchmarks/bench_model.py                                       # embedded tiny Llama, 1 process
    python benchmarks/bench_model.py --ranks 2 --set deepspeed.zero_stage=3 --methods falqon lora
    python benchmarks/bench_model.py --shape llama-7b --layers 2 --steps 12 \\
        --set train.micro_batch_size=4 model.max_length=512                # 7B-shaped layers, random init
    python benchmarks/bench_model.py --quick --out /tmp/bm                 # seconds (used by the tests)

For each method, one run of ``launch/train.py`` (plain ``python`` for one process, the ``deepspeed``
launcher for ``--ranks N``) with ``method=<m>``, the same data, schedule and steps, in its own
``run.dir`` under ``--out``; then its ``metrics.jsonl`` is read. There is no second training loop
here: the numbers are the trainer's own — DeepSpeed engine, ZeRO stage, bf16, FALQON's merges and
all. ``--set KEY=VALUE`` passes Hydra overrides to every method (default ``deepspeed.zero_stage=2``,
where every method runs, qlora included), ``--lr METHOD=VALUE`` sets one method's learning rate
(default: each method's own, ``conf/method/<m>.yaml``).

Reported per method: median step time and tokens/s over the steps after ``--warmup``; peak memory
(``mem_peak_mb`` of the trainer: CUDA allocator peak, or max RSS on CPU); parameter storage
(``param_bytes`` / ``params`` of the whole model) and trainable parameters; eval loss before →
after; exact match (synthetic task). Ratios against ``lora`` and ``fp8_lora``. A method that cannot
run here (``qlora`` without bitsandbytes or under ZeRO-3) is skipped with the trainer's reason.

``--shape llama-7b --layers N`` (or ``--shape custom --hidden H --intermediate I --layers N``)
first writes a randomly initialized Llama with the embedded model's character tokenizer to
``--out/model`` and trains that (``model.name_or_path``), so the layer shapes are a 7B model's.

Writes ``results.json``, ``results.md`` and ``results.png`` into ``--out`` (rewritten after every
method, so a run cut short keeps what it measured); each method's ``train.log`` stays in its run dir.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ("falqon", "lora", "fp8_lora", "full", "qlora")
#: The ZeRO stage unless ``--set deepspeed.zero_stage=N`` says otherwise: every method (qlora too) runs at 2.
DEFAULT_ZERO = "deepspeed.zero_stage=2"
SHAPES = {"llama-7b": {"hidden": 4096, "intermediate": 11008, "heads": 32}}
QUICK = {
    "steps": 6,
    "warmup": 2,
    "set": [
        "train.micro_batch_size=4",
        "model.max_length=64",
        "data.num_train=200",
        "data.num_eval=16",
        "train.eval_samples=16",
        "train.eval_generate_samples=4",
    ],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--steps", type=int, default=60, help="optimizer steps per method (train.max_steps)"
    )
    p.add_argument(
        "--warmup", type=int, default=5, help="first steps left out of the timing median"
    )
    p.add_argument(
        "--ranks", type=int, default=1, help="processes (>1: the deepspeed launcher, --num_gpus N)"
    )
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="Hydra overrides for every method"
    )
    p.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="METHOD=VALUE",
        help="one method's learning rate",
    )
    p.add_argument(
        "--shape",
        default=None,
        choices=[*SHAPES, "custom"],
        help="random-init Llama of these shapes",
    )
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--layers", type=int, default=2, help="decoder layers of a --shape model")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument(
        "--timeout", type=float, default=1800, help="seconds before one method's run is killed"
    )
    p.add_argument("--python", default=sys.executable, help="interpreter for launch/train.py")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/bench_model/<timestamp>)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny settings, seconds: " + json.dumps(QUICK)
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.steps, args.warmup = QUICK["steps"], QUICK["warmup"]
        args.set = QUICK["set"] + args.set
    if args.steps <= args.warmup or args.warmup < 0:
        p.error("--steps must exceed --warmup (≥ 0): the median needs timed steps")
    args.lr_by_method = {}
    for item in args.lr:
        method, sep, value = item.partition("=")
        if not sep or method not in METHODS:
            p.error(f"--lr expects METHOD=VALUE with METHOD in {METHODS}, got {item!r}")
        args.lr_by_method[method] = float(value)
    for item in args.set:
        if "=" not in item:
            p.error(f"--set expects KEY=VALUE Hydra overrides, got {item!r}")
    if not any(item.startswith("deepspeed.zero_stage=") for item in args.set):
        args.set = [DEFAULT_ZERO, *args.set]
    if args.shape == "custom" and (args.hidden is None or args.intermediate is None):
        p.error("--shape custom needs --hidden and --intermediate")
    args.out = (
        args.out or common.REPO / "runs" / "bench_model" / time.strftime("%Y%m%d-%H%M%S")
    ).resolve()
    return args


def write_shape_model(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """A randomly initialized Llama of the requested shapes (bf16) with the tiny tokenizer, on disk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from falqon_dist.models import build_tiny_tokenizer

    base = SHAPES.get(args.shape, {})
    hidden, intermediate = args.hidden or base["hidden"], args.intermediate or base["intermediate"]
    heads = args.heads or base.get("heads") or max(1, hidden // 64)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=16 * math.ceil(len(tokenizer) / 16),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = args.out / "model"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    spec = {
        "name": f"{args.shape} shapes, {args.layers} layers, random init",
        "hidden": hidden,
        "intermediate": intermediate,
        "layers": args.layers,
        "heads": heads,
        "params": sum(p.numel() for p in model.parameters()),
    }
    return path, spec


def train_command(args: argparse.Namespace, method: str, model_path: Path | None) -> list[str]:
    """The launcher command line of one method's run."""
    overrides = [
        f"method={method}",
        f"train.max_steps={args.steps}",
        f"run.dir={args.out / method}",
        "train.save_every=0",
        "train.eval_every=0",
        "logger=none",
        *args.set,
    ]
    if model_path is not None:
        overrides.append(f"model.name_or_path={model_path}")
    if method in args.lr_by_method:
        overrides.append(f"train.lr={args.lr_by_method[method]}")
    return common.trainer_command(args.python, args.ranks, overrides)


def read_metrics(run_dir: Path, warmup: int) -> dict[str, Any]:
    """The trainer's ``metrics.jsonl`` → the benchmark's numbers for one method."""
    return common.run_summary(common.read_run_metrics(run_dir), warmup)


def run_method(args: argparse.Namespace, method: str, model_path: Path | None) -> dict[str, Any]:
    run_dir = args.out / method
    if run_dir.exists():
        shutil.rmtree(run_dir)
    command = train_command(args, method, model_path)
    common.log(f"{method}: {' '.join(command)}")
    started = time.time()
    code, output = common.run_trainer(command, args.timeout)
    result: dict[str, Any] = {"command": command, "wall_s": time.time() - started}
    if code != 0:
        reason = common.failure_reason(output, code)
        skipped = "bitsandbytes" in output or (method == "qlora" and "zero_stage" in reason)
        result.update(status="skipped" if skipped else "failed", reason=reason, tail=output[-3000:])
        return result
    result.update(read_metrics(run_dir, args.warmup))
    return result


def markdown(payload: dict[str, Any]) -> str:
    rows = payload["methods"]
    lora = rows.get("lora", {})
    fp8 = rows.get("fp8_lora", {})
    env = payload["env"]
    lines = [
        "# falqon_dist whole-model benchmark (through launch/train.py)",
        "",
        f"`{payload['command']}`",
        "",
        f"model {payload['model']['name']} · {payload['config']['ranks']} rank(s) · {payload['config']['steps']} steps "
        f"(median after {payload['config']['warmup']}) · overrides {' '.join(payload['config']['set']) or '—'} · "
        f"torch {env['torch']} · {env.get('gpu') or env['device']} · commit {env['commit']}",
        "",
    ]
    table = []
    for method, r in rows.items():
        if r.get("status") != "ok":
            table.append(
                [
                    method,
                    f"{r.get('status')}: {str(r.get('reason', ''))[:160]}",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            )
            continue
        table.append(
            [
                method,
                f"{r['step_time_ms']:.1f}",
                common.ratio(r["step_time_ms"], lora.get("step_time_ms")),
                common.ratio(r["step_time_ms"], fp8.get("step_time_ms")),
                f"{r['tokens_per_s']:,.0f}",
                common.fmt(r["peak_mem_mb"], ".0f"),
                common.fmt(r["param_bytes_per_param"], ".3f"),
                f"{r['trainable_params']:,}" if r.get("trainable_params") is not None else "—",
                f"{common.fmt(r['eval_loss_before'])} → {common.fmt(r['eval_loss'])}",
                common.fmt(r["exact_match"], ".3f"),
            ]
        )
    lines.append(
        common.markdown_table(
            [
                "method",
                "step ms",
                "× lora",
                "× fp8_lora",
                "tokens/s",
                "peak MB",
                "param B/param",
                "trainable",
                "eval loss",
                "exact match",
            ],
            table,
        )
    )
    return "\n".join(lines) + "\n"


def write_reports(payload: dict[str, Any]) -> str:
    out = Path(payload["out"])
    common.write_json(out / "results.json", payload)
    text = markdown(payload)
    (out / "results.md").write_text(text)
    ok = {m: r for m, r in payload["methods"].items() if r.get("status") == "ok"}
    if ok:
        common.bar_chart(
            out / "results.png",
            [
                ("step time (ms, median)", list(ok), [r["step_time_ms"] for r in ok.values()]),
                ("peak memory (MB)", list(ok), [r["peak_mem_mb"] for r in ok.values()]),
                ("eval loss after", list(ok), [r["eval_loss"] for r in ok.values()]),
            ],
            f"{payload['model']['name']} | {payload['env'].get('gpu') or payload['env']['device']}",
        )
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    model_path, spec = None, {"name": "tiny (embedded, pretrained)"}
    if args.shape:
        model_path, spec = write_shape_model(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    payload: dict[str, Any] = {
        "command": "python benchmarks/bench_model.py " + " ".join(args.argv),
        "out": str(args.out),
        "env": common.environment(device),
        "model": spec,
        "config": {
            "steps": args.steps,
            "warmup": args.warmup,
            "ranks": args.ranks,
            "set": args.set,
            "lr": args.lr_by_method,
            "methods": args.methods,
        },
        "methods": {},
    }
    for method in common.progress(args.methods, "methods", "method"):
        payload["methods"][method] = run_method(args, method, model_path)
        r = payload["methods"][method]
        common.log(
            f"{method}: {r.get('status')}"
            + (
                f", {r['step_time_ms']:.1f} ms/step"
                if r.get("status") == "ok"
                else f" ({r.get('reason')})"
            )
        )
        write_reports(payload)
    return common.finish(payload, write_reports)


if __name__ == "__main__":
    main()
