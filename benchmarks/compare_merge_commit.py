#!/usr/bin/env python
"""Today's every-row merge against the one of an earlier commit, paired in one process.

    python benchmarks/compare_merge_commit.py 17188ee                 # 32 layers 4096x4096, rank 64
    python benchmarks/compare_merge_commit.py 17188ee --layers 4 --rounds 2

The earlier commit's ``falqon_dist/method/proxy.py`` (which held the merge before it was tiled) is
read with ``git show`` into a temporary module and imported next to today's code; both merge the
same layers (nearest rounding, with the carry), rounds alternating which goes first. Prints whether
one layer's bytes and carry are equal, and the median time of each with the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import common  # noqa: E402
from falqon_dist import fp8  # noqa: E402
from falqon_dist.method import every_row  # noqa: E402
from falqon_dist.method.merge_math import adapter_projector  # noqa: E402
from falqon_dist.method.rounding import Rounding  # noqa: E402


def load_old_proxy(commit: str):
    source = subprocess.run(
        ["git", "show", f"{commit}:falqon_dist/method/proxy.py"],
        cwd=common.REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_proxy.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_proxy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_proxy"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    if not hasattr(module, "merge_every_row_"):
        sys.exit(f"{commit}: its proxy.py has no merge_every_row_ to compare with")
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("commit")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    old = load_old_proxy(args.commit)
    out, in_features = (int(v) for v in args.shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in common.progress(range(args.layers), "layers", "layer"):
        bits = fp8.to_bits(
            (torch.randn(out + args.rank, in_features, generator=gen) * 40)
            .clamp(-448, 448)
            .to(fp8.E4M3)
        ).clone()
        adapter_q = bits[out:].view(fp8.E4M3).float()
        layers.append(
            (
                bits,
                torch.randn(out, args.rank, generator=gen) * 1e-2,
                adapter_q,
                adapter_projector(adapter_q),
            )
        )

    def merge_old():
        for bits, proxy, adapter_q, projector in layers:
            old.merge_every_row_(bits[:out], proxy, adapter_q, old.NEAREST, projector=projector)

    def merge_new():
        for bits, proxy, adapter_q, projector in layers:
            every_row.merge_every_row_(bits, 0, proxy, adapter_q, Rounding(), projector=projector)

    bits, proxy, adapter_q, projector = layers[0]
    mine, theirs = bits.clone(), bits.clone()
    carry_old = old.merge_every_row_(
        theirs[:out], proxy, adapter_q, old.NEAREST, projector=projector
    ).carry
    carry_new = every_row.merge_every_row_(
        mine, 0, proxy, adapter_q, Rounding(), projector=projector
    ).carry
    print(
        f"one layer: bytes equal {torch.equal(mine, theirs)}, carry equal {torch.equal(carry_old, carry_new)}"
    )
    merge_old(), merge_new()  # warm-up: compile
    times = {"old": [], "new": []}
    for index in common.progress(range(args.rounds), "paired rounds", "round"):
        pair = [("old", merge_old), ("new", merge_new)]
        for name, fn in pair if index % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    old_ms, new_ms = statistics.median(times["old"]), statistics.median(times["new"])
    ratios = [n / o for o, n in zip(times["old"], times["new"])]
    print(
        f"{args.layers} layers {args.shape}, rank {args.rank}, {torch.get_num_threads()} threads: "
        f"{args.commit} {old_ms:.0f} ms, today {new_ms:.0f} ms per merge of all layers; "
        f"today / {args.commit}: {new_ms / old_ms:.2f} (per round {', '.join(f'{r:.2f}' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
