#!/usr/bin/env python
"""The every-row proxy merge (FALQON's default), implementation against implementation.

    python benchmarks/bench_merge.py                          # CPU: 32 layers 4096×4096, rank 64
    python benchmarks/bench_merge.py --device cuda            # GPU: + the Triton kernel
    python benchmarks/bench_merge.py --quick --out /tmp/m     # small shapes, seconds (used by the tests)

Every implementation merges B (out × r, fp32) into the same layers' FP8 bytes, ``W ← Q(W + B·A_q)``
for every row with the carry ``C = R·P``, in one process, round-robin (a change of machine load hits
all alike); the median per implementation is reported:

* ``untiled (as first written)``: the update ``U = B·A_q`` and the residual ``R`` as whole out × in
  fp32 tensors (the element-wise merge compiled, as before);
* ``tiled (torch)``: :mod:`falqon_dist.method.every_row` on torch ops: the CPU path and the reference;
* ``triton kernel`` (CUDA with Triton): :mod:`falqon_dist.method.merge_kernel`, one launch per layer;
* ``paper merge (top-r rows)``: the authors' merge of r rows, no carry, for scale.

Then one layer's merge in parts, with what the eager ops read and write (counted op by op by
:class:`falqon_dist.fp8.instrument.OpTraffic`; the compiled element-wise merge fuses its ops, so
its real traffic is lower), per backbone element, and the largest temporary. The kernel's row
counts its one launch's inputs and outputs. Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import common  # noqa: E402
from falqon_dist import FalqonConfig, FalqonLinear, fp8  # noqa: E402
from falqon_dist.fp8.instrument import HostSyncCounter, OpTraffic  # noqa: E402
from falqon_dist.method import every_row, merge_kernel  # noqa: E402
from falqon_dist.method.merge_math import merged_row_bits, project_onto_adapter, row_updates  # noqa: E402
from falqon_dist.method.proxy import merge_slice_, select_rows  # noqa: E402
from falqon_dist.method.rounding import Rounding  # noqa: E402


def build_layers(
    count: int, out: int, in_features: int, rank: int, device: torch.device
) -> list[FalqonLinear]:
    """FALQON layers (every row, carry) with random FP8 bytes and a random B: the merge's work does not
    depend on where the bytes came from, so no SVD init is spent on them."""
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in common.progress(range(count), f"{count} layers {out}x{in_features}", "layer"):
        layer = FalqonLinear(
            in_features, out, config=FalqonConfig(rank=rank, backend="emulated"), device=device
        )
        with torch.no_grad():
            codes = (
                (torch.randn(out + rank, in_features, generator=gen) * 40)
                .clamp(-448, 448)
                .to(fp8.E4M3)
            )
            layer.qweight.copy_(fp8.to_bits(codes).to(device))
            layer.B.copy_((torch.randn(out, rank, generator=gen) * 1e-2).to(device))
        layers.append(layer)
    return layers


def untiled_merge_(layer: FalqonLinear, proxy: torch.Tensor) -> None:
    """The every-row merge as first written: whole out × in update and residual."""
    out = layer.out_features
    adapter_q = layer.adapter_q()
    merged = merged_row_bits(layer.qweight.data[:out], row_updates(proxy, adapter_q))
    layer.qweight.data[:out].copy_(merged.bits)
    project_onto_adapter(merged.residual, layer.adapter_projector(adapter_q))


def tiled_merge_(layer: FalqonLinear, proxy: torch.Tensor, kernel: str, step: int = 1) -> None:
    every_row.set_merge_kernel(kernel)
    try:
        layer.merge_rows_(proxy, None, step=step)
    finally:
        every_row.set_merge_kernel("auto")


def paper_merge_(layer: FalqonLinear, proxy: torch.Tensor) -> None:
    rows = select_rows(proxy, layer.rank)
    merge_slice_(layer.qweight.data, 0, proxy, rows, layer.adapter_q())


def implementations(
    device: torch.device,
) -> dict[str, Callable[[FalqonLinear, torch.Tensor], None]]:
    impls: dict[str, Callable[[FalqonLinear, torch.Tensor], None]] = {
        "untiled (as first written)": untiled_merge_,
        "tiled (torch)": lambda layer, proxy: tiled_merge_(layer, proxy, "torch"),
    }
    if device.type == "cuda" and merge_kernel.available():
        impls["triton kernel"] = lambda layer, proxy: tiled_merge_(layer, proxy, "triton")
    impls["paper merge (top-r rows)"] = paper_merge_
    return impls


def time_merges(
    layers: list[FalqonLinear], device: torch.device, rounds: int
) -> dict[str, dict[str, float]]:
    proxies = [layer.B.detach().float() for layer in layers]

    def merge_all(impl):
        return lambda: [impl(layer, proxy) for layer, proxy in zip(layers, proxies)]

    impls = implementations(device)
    for name, impl in impls.items():  # warm-up: compile, autotune, caches
        common.log(f"warm-up: {name}")
        merge_all(impl)()
    times = common.interleaved_medians(
        {name: merge_all(impl) for name, impl in impls.items()}, device, rounds
    )
    return {
        name: {
            "ms": statistics.median(t),
            "min_ms": min(t),
            "ms_per_layer": statistics.median(t) / len(layers),
        }
        for name, t in times.items()
    }


def traffic(fn: Callable[[], Any]) -> dict[str, float]:
    with OpTraffic() as counter:
        fn()
    return {
        "ops": counter.ops,
        "bytes": counter.bytes_read + counter.bytes_written,
        "largest_mib": counter.largest_output / 2**20,
    }


def parts(layer: FalqonLinear, device: torch.device) -> list[dict[str, Any]]:
    """One layer's merge in parts: eager op traffic, largest temporary, time."""
    out, in_features, rank = layer.out_features, layer.in_features, layer.rank
    elements = out * in_features
    proxy = layer.B.detach().float()
    adapter_q = layer.adapter_q()
    projector = layer.adapter_projector(adapter_q)
    update = row_updates(proxy, adapter_q)
    merged = merged_row_bits(layer.qweight.data[:out], update)
    rows: list[dict[str, Any]] = []

    def row(name: str, fn: Callable[[], Any], counted: dict[str, float] | None = None) -> None:
        counted = counted or traffic(fn)
        ms = common.time_ms(fn, device, iters=3, warmup=1)
        rows.append(
            {
                "part": name,
                "ops": counted["ops"],
                "bytes_per_element": counted["bytes"] / elements,
                "largest_mib": counted["largest_mib"],
                "ms": ms,
            }
        )

    row("untiled: update GEMM B·A_q", lambda: row_updates(proxy, adapter_q))
    row(
        "untiled: element-wise merge",
        lambda: merged_row_bits(layer.qweight.data[:out].clone(), update),
    )
    row("untiled: carry GEMM R·P", lambda: project_onto_adapter(merged.residual, projector))
    row("untiled: whole merge", lambda: untiled_merge_(layer, proxy))
    row("tiled (torch), nearest: whole merge", lambda: tiled_merge_(layer, proxy, "torch"))
    # stochastic rounding goes only with the recipes that carry nothing (topk_keep, paper): its cost
    # on every row, without the carry's GEMM
    stochastic = Rounding(stochastic=True, seed=0, step=1)

    def stochastic_merge_() -> None:
        every_row.set_merge_kernel("torch")
        try:
            merge_slice_(layer.qweight.data, 0, proxy, None, adapter_q, stochastic)
        finally:
            every_row.set_merge_kernel("auto")

    row("tiled (torch), stochastic, no carry: whole merge", stochastic_merge_)
    if device.type == "cuda" and merge_kernel.available():
        # one launch: reads W's bytes, B, A_q, P once each (from the launch's view), writes the bytes,
        # the carry and the per-program counts
        launch_bytes = 2 * elements + 4 * (
            out * rank + rank * in_features + in_features * rank + out * rank
        )
        row(
            "triton kernel: whole merge",
            lambda: tiled_merge_(layer, proxy, "triton"),
            {"ops": 1, "bytes": launch_bytes, "largest_mib": out * rank * 4 / 2**20},
        )
    return rows


def markdown(payload: dict[str, Any]) -> str:
    env, cfg = payload["env"], payload["config"]
    merges = payload["merges"]
    reference = merges["untiled (as first written)"]["ms"]
    lines = [
        "# falqon_dist merge benchmark",
        "",
        f"`{payload['command']}`",
        "",
        f"device {env['device']}{' (' + env['gpu'] + ')' if env.get('gpu') else ''} · torch {env['torch']} · "
        f"triton {env.get('triton')} · {env['threads']} threads · {cfg['layers']} layers {cfg['shape']} · "
        f"rank {cfg['rank']} · {cfg['rounds']} rounds · commit {env.get('commit')}",
        "",
        "## Every-row merge with carry, all layers",
        "",
        common.markdown_table(
            ["implementation", "median ms", "min ms", "ms / layer", "× untiled"],
            [
                [
                    name,
                    common.fmt(m["ms"], ".1f"),
                    common.fmt(m["min_ms"], ".1f"),
                    common.fmt(m["ms_per_layer"], ".2f"),
                    common.ratio(m["ms"], reference),
                ]
                for name, m in merges.items()
            ],
        ),
        "",
        f"host syncs of one tiled merge of all layers: {payload['host_syncs']}",
        "",
        "## One layer's merge in parts",
        "",
        "Bytes per backbone element: what the eager ops read and write, counted op by op (the compiled",
        "element-wise merge fuses its ops; the kernel's row counts its one launch).",
        "",
        common.markdown_table(
            ["part", "ops", "bytes / element", "largest temporary MiB", "ms"],
            [
                [
                    p["part"],
                    p["ops"],
                    common.fmt(p["bytes_per_element"], ".1f"),
                    common.fmt(p["largest_mib"], ".1f"),
                    common.fmt(p["ms"], ".1f"),
                ]
                for p in payload["parts"]
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--shape", default="4096x4096", help="out x in of every layer")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed round-robin rounds")
    p.add_argument("--quick", action="store_true", help="4 layers 256x384, rank 16, 2 rounds")
    p.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results" / "merge")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.shape, args.rank, args.rounds = 4, "256x384", 16, 2
    device = torch.device(args.device)
    out, in_features = (int(v) for v in args.shape.lower().split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    layers = build_layers(args.layers, out, in_features, args.rank, device)
    payload: dict[str, Any] = {
        "command": "python benchmarks/bench_merge.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "env": common.environment(device),
        "out": str(args.out),
        "config": {
            "layers": args.layers,
            "shape": args.shape,
            "rank": args.rank,
            "rounds": args.rounds,
        },
    }
    payload["merges"] = time_merges(layers, device, args.rounds)
    with HostSyncCounter() as syncs:
        for layer in layers:
            tiled_merge_(layer, layer.B.detach().float(), "auto")
    payload["host_syncs"] = syncs.total
    payload["parts"] = parts(layers[0], device)
    common.write_json(args.out / "results.json", payload)
    report = markdown(payload)
    (args.out / "results.md").write_text(report)
    print(report)
    return payload


if __name__ == "__main__":
    main()
