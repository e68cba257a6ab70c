#!/usr/bin/env python
"""ONE linear layer, a whole training step, for every fine-tuning method side by side.

    python benchmarks/bench_layer.py                         # CPU: 4096×4096 and 4096×11008, 2048 tokens
    python benchmarks/bench_layer.py --device cuda           # GPU: the same shapes at 4096 and 16384 tokens
    python benchmarks/bench_layer.py --quick --out /tmp/b    # small shapes, seconds (used by the tests)

Every method wraps the same bf16 weight ``W`` (out × in) and runs one **training step** of that layer:
``y = layer(x)``, ``y.backward(g)`` (``x`` requires grad: the layer sits inside a network, so ∂L/∂x
is always computed), an AdamW step on its trainable parameters and, for FALQON, the proxy merge.
Timed rounds run one step of every method each (round-robin, so a change of machine load hits all
methods alike; CUDA is synchronized around each step); the median per method is reported.

Rows: ``bf16 linear, frozen W`` (the floor: only ∂L/∂x), ``full`` (W trained), ``peft LoRA``,
``qlora`` (NF4 + peft, where bitsandbytes imports), ``fp8_lora <backend>`` (separate FP8 adapter
path), ``falqon <backend>`` (the default: every row merged each step, the carry's forward term
``o_A·Cᵀ`` included), ``falqon, paper merge`` (the authors' top-r rows, B zeroed, no carry) and
``falqon, cached Wᵀ`` (the cache is kept current by the merges of the timed steps). ``te`` rows
appear where Transformer Engine runs.

Columns: median ms; × peft LoRA; × fp8_lora (same backend); effective TFLOP/s (the method's own
GEMM FLOPs per step / its step time); dynamic casts per step; host synchronizations per step
(:class:`falqon_dist.fp8.instrument.HostSyncCounter`: what would stall a GPU stream); backbone
bytes per backbone parameter; trainable parameters.

Then, per shape and token count, FALQON's step split into its parts, each timed alone: the three
casts (x, o_A, g), the three GEMMs (forward, ∂L/∂x, ∂L/∂B, each with its TFLOP/s), the AdamW step
and the merge. And once: the fused cast against the eager one (``tokens × in`` bf16, E4M3) and
the merge of ``--merge-layers`` layers of ``in × in`` (rank r), with its host syncs: nearest with
the default recipe, stochastic with the paper's (stochastic rounding takes a recipe without a carry).

On a CPU the FP8 rows measure the *work* a method does (no FP8 units: ``emulated`` dequantizes to
bf16, ``scaled_mm`` is a slow reference kernel); on an H100/H200 ``scaled_mm`` is cuBLASLt FP8.
Writes ``results.json``, ``results.md`` and ``results.png`` into ``--out`` (rewritten after each
shape, so a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from torch import nn  # noqa: E402

import common  # noqa: E402
from falqon_dist import FalqonConfig, FalqonLinear, merge_proxies_  # noqa: E402
from falqon_dist.baselines import Fp8LoraLinear, apply_lora  # noqa: E402
from falqon_dist.baselines.config import LoraConfig, QloraConfig  # noqa: E402
from falqon_dist.baselines.qlora import NF4DequantCounter  # noqa: E402
from falqon_dist.fp8 import E4M3, E5M2, check_backend, from_bits, resolve_backend  # noqa: E402
from falqon_dist.fp8 import cast as fp8_cast  # noqa: E402
from falqon_dist.method.linear import shared_input_casts  # noqa: E402

GPU_TOKENS = [4096, 16384]
CPU_TOKENS = [2048]
SHAPES = ["4096x4096", "4096x11008"]


class _Holder(nn.Module):
    """A one-linear container so that peft can target ``proj`` by name."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _bf16_linear(weight: torch.Tensor, trainable: bool) -> nn.Linear:
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
    linear.weight.requires_grad_(trainable)
    return linear


def _lora(weight: torch.Tensor, rank: int) -> nn.Module:
    holder = _Holder(_bf16_linear(weight, trainable=False))
    apply_lora(holder, LoraConfig(rank=rank), target_modules=["proj"])
    return holder


def _qlora(weight: torch.Tensor, rank: int) -> nn.Module:
    from falqon_dist.baselines import apply_qlora

    holder = _Holder(_bf16_linear(weight, trainable=False))
    apply_qlora(holder, QloraConfig(rank=rank), target_modules=["proj"])
    return holder


#: The authors' merge: the top-r rows of B each step, all of B zeroed after it, no carry.
PAPER_MERGE = {"merge": "paper"}


def _falqon(
    weight: torch.Tensor, rank: int, backend: str, cache: bool = False, init: str = "svd", **merge
) -> FalqonLinear:
    """A FALQON layer of ``weight``: the default merge (every row, with the carry) unless ``merge``
    names other :class:`FalqonConfig` fields (e.g. :data:`PAPER_MERGE`)."""
    config = FalqonConfig(
        rank=rank, backend=backend, cache_weight_transpose=cache, init=init, **merge
    )
    return FalqonLinear.from_linear(_bf16_linear(weight, trainable=False), config)


def fp8_backends(device: torch.device) -> list[str]:
    """The FP8 backends measured on ``device``: ``te`` only where Transformer Engine can run."""
    backends = ["emulated", "scaled_mm"]
    if device.type == "cuda":
        try:
            check_backend("te")
            backends.append("te")
        except ImportError as exc:
            common.log(f"te rows skipped: {exc}")
    return backends


def methods(
    rank: int, backends: list[str], init: str = "svd"
) -> list[tuple[str, str | None, Callable[[torch.Tensor], nn.Module]]]:
    """``(method, backend, builder(weight) -> module)`` for every row, in table order."""
    rows: list[tuple[str, str | None, Callable[[torch.Tensor], nn.Module]]] = [
        ("bf16 linear, frozen W", None, lambda w: _bf16_linear(w, trainable=False)),
        ("full", None, lambda w: _bf16_linear(w, trainable=True)),
        ("peft LoRA", None, lambda w: _lora(w, rank)),
    ]
    if importlib.util.find_spec("bitsandbytes") is not None:
        rows.append(("qlora (NF4)", None, lambda w: _qlora(w, rank)))
    for b in backends:
        rows.append(
            (
                "fp8_lora",
                b,
                lambda w, b=b: Fp8LoraLinear.from_linear(
                    _bf16_linear(w, False), rank=rank, backend=b
                ),
            )
        )
    for b in backends:
        rows.append(("falqon", b, lambda w, b=b: _falqon(w, rank, b, init=init)))
        rows.append(
            ("falqon, paper merge", b, lambda w, b=b: _falqon(w, rank, b, init=init, **PAPER_MERGE))
        )
        if b != "emulated":  # the emulated GEMM does not care about operand layout
            rows.append(
                ("falqon, cached Wᵀ", b, lambda w, b=b: _falqon(w, rank, b, cache=True, init=init))
            )
    return rows


def gemm_flops(method: str, tokens: int, d_in: int, d_out: int, rank: int) -> float:
    """FLOPs of the GEMMs one training step of ``method`` runs (2·M·N·K each)."""
    frozen = 2 * 2 * tokens * d_in * d_out  # y = x Wᵀ and ∂L/∂x = g W
    if method.startswith("bf16"):
        return frozen
    if method == "full":
        return frozen + 2 * tokens * d_in * d_out  # + ∂L/∂W
    if method.startswith("falqon"):  # x·[W;A]ᵀ, g·W, gᵀ·o_A
        melded = (
            2 * tokens * d_in * (d_out + rank)
            + 2 * tokens * d_out * d_in
            + 2 * tokens * d_out * rank
        )
        if "paper merge" in method:  # B is zero at every forward
            return melded
        # the default (every row, carry): the forward's o_A·Cᵀ
        return melded + 2 * tokens * rank * d_out
    # LoRA paths: x·Aᵀ, h·Bᵀ forward; ∂B, ∂h, ∂A, ∂x through A backward
    return frozen + 3 * 2 * tokens * rank * (d_in + d_out)


class LayerStep:
    """One training step of one layer: fwd + bwd, AdamW, and the FALQON merge after it."""

    def __init__(self, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        self.module, self.x, self.grad = module, x, grad
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr) if self.params else None
        self.merges = isinstance(module, FalqonLinear)
        self.step = 0

    def forward_backward(self) -> None:
        self.x.grad = None
        shared_input_casts.clear()  # the same x every step: time its cast as a new activation's
        self.module(self.x).backward(self.grad)

    def optimize(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def merge(self) -> None:
        if self.merges:
            self.step += 1
            self.module.merge_proxy_(step=self.step)

    def __call__(self) -> None:
        self.forward_backward()
        self.optimize()
        self.merge()


def _backbone_bytes_per_param(module: nn.Module) -> float:
    """Backbone bytes per backbone parameter of the adapted layer (peft wrappers: their base layer)."""
    layer = next((m for m in module.modules() if hasattr(m, "base_layer")), None)
    if layer is None:
        layer = module.proj if isinstance(module, _Holder) else module
    nbytes, params = common.backbone_storage(layer)
    return nbytes / params


def _counted_step(step: LayerStep) -> tuple[int, int]:
    """(dynamic casts incl. NF4 dequantizations, host syncs of fwd + bwd + merge) of one untimed step.

    The optimizer is left out of the sync count: torch's AdamW reads its step counter with
    ``.item()``, a CPU tensor even for CUDA parameters, which a CPU count cannot tell from a stall.
    """
    with common.count_casts() as casts, NF4DequantCounter() as nf4:
        with common.HostSyncCounter() as syncs:
            step.forward_backward()
        step.optimize()
        with common.HostSyncCounter() as merge_syncs:
            step.merge()
    return len(casts) + nf4.count, syncs.total + merge_syncs.total


def run_methods(args, device, d_in: int, d_out: int, tokens: int) -> list[dict[str, Any]]:
    """Every method on the same weight and inputs; ratio columns filled in."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(d_out, d_in, generator=gen) * 0.02).to(device, torch.bfloat16)
    x = torch.randn(tokens, d_in, generator=gen).to(device, torch.bfloat16).requires_grad_()
    grad = (torch.randn(tokens, d_out, generator=gen) * 1e-3).to(device, torch.bfloat16)
    rows, steps = [], {}
    for name, backend, build in common.progress(
        methods(args.rank, fp8_backends(device), args.init),
        f"{d_in}x{d_out}, {tokens} tok: build",
        "method",
    ):
        row: dict[str, Any] = {
            "method": name,
            "backend": backend,
            "shape": f"{d_in}x{d_out}",
            "tokens": tokens,
        }
        try:
            module = build(weight)
            step = LayerStep(
                module, x, grad, lr=args.lr_falqon if name.startswith("falqon") else 1e-3
            )
            row["casts"], row["host_syncs"] = _counted_step(step)
            for _ in range(args.warmup):
                step()
            row["backbone_bytes_per_param"] = _backbone_bytes_per_param(module)
            row["trainable_params"] = sum(p.numel() for p in step.params)
            row["gemm_flops"] = gemm_flops(name, tokens, d_in, d_out, args.rank)
            steps[len(rows)] = step
        except Exception as exc:  # a backend the hardware lacks must not sink the other rows
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    times = common.interleaved_medians({str(i): s for i, s in steps.items()}, device, args.repeats)
    for index, step_times in times.items():
        row = rows[int(index)]
        row["times_ms"] = step_times
        row["median_ms"] = statistics.median(step_times)
        row["tflops"] = common.tflops(row["gemm_flops"], row["median_ms"])
    by_key = {(r["method"], r["backend"]): r for r in rows}
    lora = by_key[("peft LoRA", None)].get("median_ms")
    auto = resolve_backend("auto", device).name
    for r in rows:
        fp8_ref = by_key.get(("fp8_lora", r["backend"] or auto), {}).get("median_ms")
        r["x_lora"] = r["median_ms"] / lora if "median_ms" in r and lora else None
        r["x_fp8_lora"] = r["median_ms"] / fp8_ref if "median_ms" in r and fp8_ref else None
    return rows


def falqon_breakdown(
    args, device, d_in: int, d_out: int, tokens: int, backend_name: str
) -> dict[str, Any]:
    """FALQON's step split into its parts, each timed alone (same shapes as the step)."""
    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(d_out, d_in, generator=gen) * 0.02).to(device, torch.bfloat16)
    layer = _falqon(weight, args.rank, backend_name, init="random")
    backend = resolve_backend(backend_name, device)
    x = torch.randn(tokens, d_in, generator=gen).to(device, torch.bfloat16)
    g = (torch.randn(tokens, d_out, generator=gen) * 1e-3).to(device, torch.bfloat16)
    o_a = torch.randn(tokens, args.rank, generator=gen).to(device, torch.bfloat16)
    x_q, sx, _ = backend.quantize(x, E4M3)
    g_q, sg, g_t = backend.quantize(g, E5M2, transpose=True)
    _, so, o_t = backend.quantize(o_a, E4M3, transpose=True)
    melded = from_bits(layer.qweight, E4M3)
    w = melded[:d_out]
    it = dict(iters=args.repeats, warmup=2)
    parts = {
        "cast x (E4M3)": common.time_ms(lambda: backend.quantize(x, E4M3), device, **it),
        "cast o_A (E4M3, ᵀ)": common.time_ms(
            lambda: backend.quantize(o_a, E4M3, transpose=True), device, **it
        ),
        "cast g (E5M2, +ᵀ)": common.time_ms(
            lambda: backend.quantize(g, E5M2, transpose=True), device, **it
        ),
        "GEMM fwd x·[W;A]ᵀ": common.time_ms(
            lambda: backend.gemm(x_q, melded.t(), sx, layer.scale, torch.bfloat16, fast_accum=True),
            device,
            **it,
        ),
        "GEMM ∂L/∂x = g·W": common.time_ms(
            lambda: backend.gemm(g_q, w, sg, layer.scale, torch.bfloat16), device, **it
        ),
        "GEMM ∂L/∂B = gᵀ·o_A": common.time_ms(
            lambda: backend.gemm(g_t, o_t.t(), sg, so, torch.float32), device, **it
        ),
    }
    flops = {
        "GEMM fwd x·[W;A]ᵀ": 2 * tokens * d_in * (d_out + args.rank),
        "GEMM ∂L/∂x = g·W": 2 * tokens * d_out * d_in,
        "GEMM ∂L/∂B = gᵀ·o_A": 2 * tokens * d_out * args.rank,
    }
    layer.B.grad = torch.randn_like(layer.B) * 1e-3
    optimizer = torch.optim.AdamW([layer.B], lr=args.lr_falqon)
    parts["AdamW on B"] = common.time_ms(optimizer.step, device, **it)
    counter = iter(range(10**9))
    # the merge does the same fixed-shape work whatever B holds (no data-dependent shapes), so
    # repeated merges time it without refilling B
    parts["merge (every row, carry)"] = common.time_ms(
        lambda: layer.merge_proxy_(step=next(counter)), device, **it
    )
    paper = _falqon(weight, args.rank, backend_name, init="random", **PAPER_MERGE)
    parts["merge (paper: top-r rows)"] = common.time_ms(
        lambda: paper.merge_proxy_(step=next(counter)), device, **it
    )
    return {
        "shape": f"{d_in}x{d_out}",
        "tokens": tokens,
        "backend": backend_name,
        "parts_ms": parts,
        "gemm_tflops": {k: common.tflops(flops[k], parts[k]) for k in flops},
        # the default's step
        "sum_ms": sum(ms for name, ms in parts.items() if not name.startswith("merge (paper")),
    }


def cast_comparison(args, device, d_in: int, tokens: int) -> dict[str, Any]:
    """The fused (compiled) cast against the eager one on ``tokens × in`` bf16 → E4M3."""
    x = torch.randn(tokens, d_in, device=device).to(torch.bfloat16)
    it = dict(iters=max(args.repeats, 5), warmup=2)
    result = {"shape": f"{tokens}x{d_in}"}
    for mode in ("eager", "compiled"):
        fp8_cast.set_cast_kernels(mode)
        result[f"{mode}_ms"] = common.time_ms(lambda: fp8_cast.dynamic_cast(x, E4M3), device, **it)
    fp8_cast.set_cast_kernels(args.cast)
    bytes_moved = x.numel() * (2 + 2 + 1)  # read x twice (amax, cast), write one byte
    result["speedup"] = result["eager_ms"] / result["compiled_ms"]
    result["compiled_gb_per_s"] = bytes_moved / (result["compiled_ms"] * 1e-3) / 1e9
    return result


def merge_bench(args, device, d: int) -> dict[str, Any]:
    """The proxy merge of ``--merge-layers`` layers of d × d (rank r) in one call: time and host syncs."""
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential()
    for i in common.progress(
        range(args.merge_layers), f"merge bench: {args.merge_layers} layers {d}x{d}", "layer"
    ):
        weight = (torch.randn(d, d, generator=gen) * 0.02).to(device, torch.bfloat16)
        model.add_module(str(i), _falqon(weight, args.rank, "emulated", init="random"))
    counter = iter(range(10**9))
    result: dict[str, Any] = {"layers": args.merge_layers, "shape": f"{d}x{d}", "rank": args.rank}
    # nearest: the default recipe (every row, the carry); stochastic rounding goes with a recipe that
    # carries nothing (the paper's merge here, as bench_learning's falqon_stochastic)
    for rounding, recipe in (
        ("nearest", {}),
        ("stochastic", {**PAPER_MERGE, "merge_rounding": "stochastic"}),
    ):
        for layer in model:
            layer.config = dataclasses.replace(layer.config, **recipe)
        # fixed-shape work whatever B holds (see falqon_breakdown): no refill inside the timed call
        ms = common.time_ms(
            lambda: merge_proxies_(model, step=next(counter)), device, iters=args.repeats, warmup=1
        )
        result[f"{rounding}_ms"] = ms
        result[f"{rounding}_ms_per_layer"] = ms / args.merge_layers
    with torch.no_grad():
        for layer in model:
            layer.B.normal_(std=1e-3)
    with common.HostSyncCounter() as syncs:
        merge_proxies_(model, step=0)
    result["host_syncs"] = syncs.total
    return result


def markdown(payload: dict[str, Any]) -> str:
    env, cfg = payload["env"], payload["config"]
    lines = [
        "# falqon_dist one-layer benchmark",
        "",
        f"`{payload['command']}`",
        "",
        f"device {env['device']}{' (' + env['gpu'] + ')' if env.get('gpu') else ''} · torch {env['torch']} · "
        f"{env['threads']} threads · rank {cfg['rank']} · bf16 · fp8 casts {cfg['cast']} · "
        f"median of {cfg['repeats']} interleaved rounds · commit {env['commit']}",
        "",
        "A step = forward + backward (∂L/∂x always) + AdamW + FALQON's merge.",
    ]
    for block in payload["shapes"]:
        lines += ["", f"## {block['shape']}, {block['tokens']} tokens", ""]
        table = []
        for r in block["methods"]:
            if "error" in r:
                table.append(
                    [
                        r["method"],
                        r["backend"] or "—",
                        f"error: {r['error'][:200]}",
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
                    r["method"],
                    r["backend"] or "—",
                    f"{r['median_ms']:.1f}",
                    common.fmt(r["x_lora"], ".2f"),
                    common.fmt(r["x_fp8_lora"], ".2f"),
                    common.fmt(r["tflops"], ".2f"),
                    r["casts"],
                    r["host_syncs"],
                    f"{r['backbone_bytes_per_param']:.3f}",
                    f"{r['trainable_params']:,}",
                ]
            )
        lines.append(
            common.markdown_table(
                [
                    "method",
                    "backend",
                    "median ms",
                    "× peft LoRA",
                    "× fp8_lora",
                    "TFLOP/s",
                    "casts",
                    "host syncs",
                    "backbone B/param",
                    "trainable",
                ],
                table,
                "llrrrrrrrr",
            )
        )
        b = block.get("falqon_breakdown")
        if b:
            lines += [
                "",
                f"FALQON ({b['backend']}) step, parts timed alone (sum {b['sum_ms']:.1f} ms):",
                "",
            ]
            lines.append(
                common.markdown_table(
                    ["part", "ms", "TFLOP/s"],
                    [
                        [k, f"{v:.2f}", common.fmt(b["gemm_tflops"].get(k), ".2f")]
                        for k, v in b["parts_ms"].items()
                    ],
                )
            )
    c = payload.get("cast")
    if c:
        lines += [
            "",
            f"## Dynamic cast {c['shape']} bf16 → E4M3",
            "",
            f"eager {c['eager_ms']:.2f} ms · compiled {c['compiled_ms']:.2f} ms · **{c['speedup']:.1f}×** · "
            f"compiled moves {c['compiled_gb_per_s']:.1f} GB/s",
        ]
    m = payload.get("merge")
    if m:
        lines += [
            "",
            f"## Merge of {m['layers']} layers {m['shape']}, rank {m['rank']}",
            "",
            f"nearest {m['nearest_ms']:.1f} ms per merge ({m['nearest_ms_per_layer']:.2f} ms per layer) · "
            f"stochastic (paper merge) {m['stochastic_ms']:.1f} ms "
            f"({m['stochastic_ms_per_layer']:.2f} ms per layer) · "
            f"{m['host_syncs']} host syncs",
        ]
    return "\n".join(lines) + "\n"


def write_reports(payload: dict[str, Any], out: Path) -> str:
    common.write_json(out / "results.json", payload)
    text = markdown(payload)
    (out / "results.md").write_text(text)
    panels = []
    for block in payload["shapes"]:
        ok = [r for r in block["methods"] if "median_ms" in r]
        labels = [r["method"] + (f" {r['backend']}" if r["backend"] else "") for r in ok]
        panels.append(
            (
                f"{block['shape']}, {block['tokens']} tok: ms/step",
                labels,
                [r["median_ms"] for r in ok],
            )
        )
    if panels:
        common.bar_chart(
            out / "results.png",
            panels,
            f"one layer, rank {payload['config']['rank']}, {payload['env']['device']}",
        )
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shapes", nargs="+", default=SHAPES, help="IN x OUT of the layer (e.g. 4096x11008)"
    )
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=None,
        help=f"rows of x (default: GPU {GPU_TOKENS}, CPU {CPU_TOKENS})",
    )
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed steps before timing (after one counting step)",
    )
    p.add_argument(
        "--lr-falqon", type=float, default=0.05, help="AdamW lr of FALQON's B (others: 1e-3)"
    )
    p.add_argument(
        "--merge-layers", type=int, default=32, help="layers in the merge benchmark (0 = skip)"
    )
    p.add_argument(
        "--init",
        default="svd",
        choices=["svd", "random"],
        help="FALQON's adapter init (random skips the SVD: same speed, faster set-up)",
    )
    p.add_argument(
        "--cast",
        default="compiled",
        choices=fp8_cast.CAST_KERNELS,
        help="FP8 cast kernels of the rows",
    )
    p.add_argument("--no-breakdown", action="store_true", help="skip FALQON's per-part timing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/bench_layer/<timestamp>)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="256x256 and 256x512, 128 tokens, rank 16, 4 merge layers",
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.shapes, args.tokens, args.rank, args.merge_layers = (
            ["256x256", "256x512"],
            args.tokens or [128],
            16,
            4,
        )
        args.repeats = min(args.repeats, 3)
    device = torch.device(args.device)
    args.tokens = args.tokens or (GPU_TOKENS if device.type == "cuda" else CPU_TOKENS)
    try:
        args.shape_pairs = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        assert all(len(s) == 2 for s in args.shape_pairs)
    except (ValueError, AssertionError):
        p.error(f"--shapes takes IN x OUT pairs such as 4096x11008, got {args.shapes}")
    if args.warmup < 0 or args.repeats < 1:
        p.error("--warmup must be ≥ 0 and --repeats ≥ 1")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    args.out = args.out or common.REPO / "runs" / "bench_layer" / time.strftime("%Y%m%d-%H%M%S")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    fp8_cast.set_cast_kernels(args.cast)
    args.out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "command": "python benchmarks/bench_layer.py " + " ".join(args.argv),
        "env": common.environment(device),
        "config": {k: v for k, v in vars(args).items() if k not in ("argv", "out", "shape_pairs")},
        "shapes": [],
    }
    gpu_fp8 = resolve_backend("auto", device).name
    for d_in, d_out in args.shape_pairs:
        for tokens in args.tokens:
            block = {
                "shape": f"{d_in}x{d_out}",
                "tokens": tokens,
                "methods": run_methods(args, device, d_in, d_out, tokens),
            }
            if not args.no_breakdown:
                block["falqon_breakdown"] = falqon_breakdown(
                    args, device, d_in, d_out, tokens, gpu_fp8
                )
            payload["shapes"].append(block)
            write_reports(payload, args.out)
    d_in = args.shape_pairs[0][0]
    payload["cast"] = cast_comparison(args, device, d_in, args.tokens[0])
    if args.merge_layers:
        payload["merge"] = merge_bench(args, device, d_in)
    text = write_reports(payload, args.out)
    print(text)
    common.log(f"wrote {args.out}/results.{{json,md,png}}")
    return payload


if __name__ == "__main__":
    main()
