#!/usr/bin/env python
"""Micro-benchmark of ONE linear layer, forward + backward, for every fine-tuning method side by side.

    python launch/bench_layer.py                              # 4096×4096, rank 64, 2048 tokens, CPU
    python launch/bench_layer.py --device cuda --json bench.json
    python launch/bench_layer.py --quick                      # small shapes, seconds (used by tests)

Each method wraps the same bf16 weight ``W`` (out × in) and runs ``y = layer(x)``;
``y.backward(g)`` on bf16 activations ``x`` (tokens × in, ``requires_grad``: the layer sits inside a
network, so ∂L/∂x is always computed). Every layer is built, run once untimed to count its
quantizations, and warmed up with ``--warmup`` more untimed steps; then ``--repeats`` timed rounds
run one step of every method each (round-robin, so load changes on a shared machine hit all methods
alike; CUDA is synchronized around each step) and the median per method is reported.

Rows:

* ``bf16 linear, frozen W``  — ``nn.Linear``, only ∂L/∂x: the floor any adapter method adds to.
* ``bf16 linear, trainable W`` — full fine-tuning of the layer: ∂L/∂x and ∂L/∂W (two backward GEMMs).
* ``peft LoRA``              — peft LoRA on the bf16 linear (adapters in bf16).
* ``qlora``                  — bitsandbytes NF4 backbone + peft LoRA (:func:`falqon_dist.baselines.apply_qlora`),
  where bitsandbytes imports.
* ``fp8_lora <backend>``     — :class:`falqon_dist.baselines.Fp8LoraLinear` (separate FP8 adapter path).
* ``falqon <backend>``       — :class:`falqon_dist.FalqonLinear` (adapter melded into the FP8 GEMM).
* ``falqon, cached Wᵀ``      — the same with ``cache_weight_transpose=True`` (no Wᵀ copy per backward;
  the cache is counted in its backbone bytes).

The ``te`` rows (Transformer Engine) are added where that backend can run (CUDA + TE installed).

Columns: median ms; ratio to peft LoRA; ratio to fp8_lora (the fp8_lora row with the same backend
for FP8 rows, the ``auto`` backend's fp8_lora row for the bf16 rows); dynamic quantizations (NF4 rows: backbone dequantizations) per forward + backward (counted with
:func:`falqon_dist.fp8.instrument.count_casts` and ``NF4DequantCounter`` during one untimed step); bytes of frozen backbone storage per backbone parameter (FALQON's 1.0x includes the r melded
A rows);
trainable parameters.

On a CPU, ``scaled_mm`` is torch's slow reference FP8 kernel (about 5× a bf16 matmul) and
``emulated`` dequantizes to bf16, so FP8 rows measure the *work* the method does, not FP8 speed; on
an H100/H200 ``scaled_mm`` is cuBLASLt FP8.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from falqon_dist import FalqonConfig, FalqonLinear
from falqon_dist.baselines import Fp8LoraLinear, apply_lora
from falqon_dist.baselines.qlora import NF4DequantCounter
from falqon_dist.fp8 import check_backend, resolve_backend
from falqon_dist.fp8.instrument import count_casts

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency; keep the script usable without it
    tqdm = None


@dataclass
class Result:
    """One row of the table."""

    method: str
    backend: str | None
    median_ms: float = float("nan")
    times_ms: list[float] = field(default_factory=list)
    ratio_vs_lora: float = float("nan")
    ratio_vs_fp8_lora: float = float("nan")
    quantize_ops: int = 0
    backbone_bytes_per_param: float = float("nan")
    trainable_params: int = 0
    error: str | None = None


class _Holder(nn.Module):
    """A one-linear container so that peft can target ``proj`` by name."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _bf16_linear(weight: torch.Tensor, trainable: bool) -> nn.Module:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    linear.weight.requires_grad_(trainable)
    return linear


def _peft_lora(weight: torch.Tensor, rank: int) -> nn.Module:
    return apply_lora(_Holder(_bf16_linear(weight, trainable=False)), rank=rank, target_modules=["proj"])


def _qlora(weight: torch.Tensor, rank: int) -> nn.Module:
    from falqon_dist.baselines import apply_qlora

    holder = _Holder(_bf16_linear(weight, trainable=False))
    apply_qlora(holder, rank=rank, target_modules=["proj"])
    return holder


def _fp8_lora(weight: torch.Tensor, rank: int, backend: str) -> nn.Module:
    linear = _bf16_linear(weight, trainable=False)
    return Fp8LoraLinear.from_linear(linear, rank=rank, backend=backend)


def _falqon(weight: torch.Tensor, rank: int, backend: str, cache_weight_transpose: bool = False) -> nn.Module:
    linear = _bf16_linear(weight, trainable=False)
    config = FalqonConfig(rank=rank, backend=backend, cache_weight_transpose=cache_weight_transpose)
    return FalqonLinear.from_linear(linear, config)


def _backbone_bytes_per_param(module: nn.Module, n_backbone: int) -> float:
    frozen = sum(_frozen_bytes(p) for p in module.parameters() if not p.requires_grad)
    if frozen == 0:  # full fine-tuning: the backbone is the trainable weight itself
        frozen = sum(p.numel() * p.element_size() for p in module.parameters())
    cache = getattr(module, "weight_t_cache", None)
    return (frozen + (cache.nbytes if cache is not None else 0)) / n_backbone


def _frozen_bytes(param: torch.Tensor) -> int:
    if getattr(param, "quant_state", None) is not None:  # bitsandbytes NF4: codes + block scales
        from falqon_dist.baselines.qlora import nf4_weight_bytes

        return nf4_weight_bytes(param)
    return param.numel() * param.element_size()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """One forward + backward with fresh gradients."""
    x.grad = None
    for p in module.parameters():
        p.grad = None
    module(x).backward(grad)


def _timed_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    _sync(x.device)
    start = time.perf_counter()
    _step(module, x, grad)
    _sync(x.device)
    return (time.perf_counter() - start) * 1e3


def _progress(iterable, desc: str, unit: str):
    if tqdm is not None:
        return tqdm(iterable, desc=desc, unit=unit, file=sys.stderr)
    print(f"[bench] {desc} ...", file=sys.stderr, flush=True)
    return iterable


def fp8_backends(device: torch.device) -> list[str]:
    """The FP8 backends measured on ``device``: ``te`` only where Transformer Engine can run."""
    backends = ["emulated", "scaled_mm"]
    if device.type == "cuda":
        try:
            check_backend("te")
            backends.append("te")
        except ImportError as exc:
            print(f"[bench] te rows skipped: {exc}", file=sys.stderr)
    return backends


def build_methods(rank: int, backends: list[str]) -> list[tuple[str, str | None, Callable[[torch.Tensor], nn.Module]]]:
    """``(method, backend, builder(weight) -> module)`` for every row, in table order."""
    rows: list[tuple[str, str | None, Callable[[torch.Tensor], nn.Module]]] = [
        ("bf16 linear, frozen W", None, lambda w: _bf16_linear(w, trainable=False)),
        ("bf16 linear, trainable W", None, lambda w: _bf16_linear(w, trainable=True)),
        ("peft LoRA", None, lambda w: _peft_lora(w, rank)),
    ]
    if importlib.util.find_spec("bitsandbytes") is not None:
        rows.append(("qlora (NF4)", None, lambda w: _qlora(w, rank)))
    for b in backends:
        rows.append(("fp8_lora", b, lambda w, b=b: _fp8_lora(w, rank, b)))
    for b in backends:
        rows.append(("falqon", b, lambda w, b=b: _falqon(w, rank, b)))
        if b != "emulated":  # the emulated GEMM does not care about operand layout
            rows.append(("falqon, cached Wᵀ", b, lambda w, b=b: _falqon(w, rank, b, cache_weight_transpose=True)))
    return rows


def run(args: argparse.Namespace) -> list[Result]:
    """Benchmark every method on the same weight and inputs; fill in the ratio columns."""
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    shape_w, shape_x = (args.out_features, args.in_features), (args.tokens, args.in_features)
    weight = (torch.randn(shape_w, generator=generator) * 0.02).to(device, torch.bfloat16)
    x = torch.randn(shape_x, generator=generator).to(device, torch.bfloat16).requires_grad_()
    grad = (torch.randn(args.tokens, args.out_features, generator=generator) * 1e-3).to(device, torch.bfloat16)

    # Phase 1: build every layer, count its quantizations in one untimed step, warm it up.
    results: list[Result] = []
    modules: dict[int, nn.Module] = {}
    methods = build_methods(args.rank, fp8_backends(device))
    for index, (name, backend, build) in enumerate(_progress(methods, "build+warm-up", "method")):
        result = Result(name, backend)
        try:
            module = build(weight)
            with count_casts() as casts, NF4DequantCounter() as nf4:
                _step(module, x, grad)
            result.quantize_ops = len(casts) + nf4.count
            for _ in range(args.warmup):
                _step(module, x, grad)
            result.backbone_bytes_per_param = _backbone_bytes_per_param(module, weight.numel())
            result.trainable_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
            modules[index] = module
        except Exception as exc:  # a backend the hardware lacks must not sink the other rows
            result.error = f"{type(exc).__name__}: {exc}"
        results.append(result)

    # Phase 2: timed rounds, one step of every method per round, so that a machine whose load
    # changes during the run slows all methods alike and the ratios stay meaningful.
    for _ in _progress(range(args.repeats), "timed rounds", "round"):
        for index, module in modules.items():
            results[index].times_ms.append(_timed_step(module, x, grad))
    for result in results:
        if result.times_ms:
            result.median_ms = statistics.median(result.times_ms)

    by_key = {(r.method, r.backend): r for r in results}
    lora = by_key[("peft LoRA", None)].median_ms
    auto = resolve_backend("auto", device).name
    for r in results:
        fp8_ref = by_key.get(("fp8_lora", r.backend if r.backend else auto))
        r.ratio_vs_lora = r.median_ms / lora
        r.ratio_vs_fp8_lora = r.median_ms / fp8_ref.median_ms if fp8_ref else float("nan")
    return results


def markdown_table(results: list[Result]) -> str:
    """The results as a markdown table (errors in the last column)."""
    lines = [
        "| method | backend | median ms | × peft LoRA | × fp8_lora | quantize ops/step "
        "| backbone B/param | trainable |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.method} | {r.backend or '—'} | error: {r.error} | | | | | |")
            continue
        lines.append(
            f"| {r.method} | {r.backend or '—'} | {r.median_ms:.1f} | {r.ratio_vs_lora:.2f} | "
            f"{r.ratio_vs_fp8_lora:.2f} | {r.quantize_ops} | {r.backbone_bytes_per_param:.3f} | "
            f"{r.trainable_params:,} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="rows of x (batch × sequence)")
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank r")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (after one counting step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="small shapes (256×256, rank 16, 128 tokens)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.in_features, args.out_features, args.rank = 128, 256, 256, 16
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--warmup must be ≥ 0 and --repeats ≥ 1")
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    header = (
        f"one layer {args.in_features}→{args.out_features}, rank {args.rank}, {args.tokens} tokens, bf16 "
        f"activations, fwd+bwd, median of {args.repeats} after {args.warmup + 1} untimed | device {args.device}"
        f" | torch {torch.__version__} | {torch.get_num_threads()} threads"
    )
    results = run(args)
    print(header)
    print()
    print(markdown_table(results))
    if args.json:
        payload = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return results


if __name__ == "__main__":
    main()
