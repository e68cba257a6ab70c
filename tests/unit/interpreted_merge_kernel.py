"""Run by test_merge_kernel.py in a fresh process with ``TRITON_INTERPRET=1`` (Triton reads it when a
kernel is defined): the Triton every-row merge kernel on CPU tensors against the torch tiles.

Exits non-zero, naming the case, at the first difference: bytes and counts must be equal, the carry
equal to fp32 rounding (the kernel sums it per column block).
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from falqon_dist import fp8  # noqa: E402
from falqon_dist.method import every_row  # noqa: E402
from falqon_dist.method.merge_math import adapter_projector  # noqa: E402
from falqon_dist.method.rounding import Rounding  # noqa: E402

RANK = 12


def _inputs(out: int, in_features: int, rank: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    bits = fp8.to_bits(
        (torch.randn(out + rank, in_features, generator=gen) * 60).clamp(-448, 448).to(fp8.E4M3)
    )
    bits = bits.clone()
    # ±0 and subnormals
    bits[3, :6] = torch.tensor([0x80, 0x00, 0x01, 0x81, 0x07, 0x87], dtype=torch.uint8)
    adapter_q = fp8.from_bits(bits, fp8.E4M3)[out:].float()
    proxy = torch.randn(out, rank, generator=gen) * 0.05
    proxy[2] *= 1e4  # saturates
    proxy[5, 0] = float("nan")  # non-finite: its elements keep their bytes
    proxy[7] = 0  # nothing to merge: -0.0 and subnormal bytes must survive as they are
    return bits, proxy, adapter_q


def _merge(kernel: str, flat, offset, proxy, adapter_q, rounding, projector):
    every_row.set_merge_kernel(kernel)
    return every_row.merge_every_row_(flat, offset, proxy, adapter_q, rounding, projector=projector)


def _check(case: str, bits, proxy, adapter_q, rounding, carry: bool, world: int) -> None:
    projector = adapter_projector(adapter_q) if carry else None
    part = -(-bits.numel() // world)
    kernel_bits, torch_bits = bits.clone().view(-1), bits.clone().view(-1)
    for rank in range(world):
        lo, hi = rank * part, min((rank + 1) * part, bits.numel())
        mine, theirs = kernel_bits[lo:hi], torch_bits[lo:hi]
        got = _merge("triton", mine, lo, proxy, adapter_q, rounding, projector)
        want = _merge("torch", theirs, lo, proxy, adapter_q, rounding, projector)
        where = f"{case}, slice {rank}/{world}"
        if not torch.equal(mine, theirs):
            sys.exit(f"{where}: {int((mine != theirs).sum())} bytes differ")
        got_counts, want_counts = got.stats.to_dict(), want.stats.to_dict()
        if got_counts != want_counts:
            sys.exit(f"{where}: counts {got_counts} != {want_counts}")
        if carry:
            scale = float(want.carry.abs().max()) or 1.0
            error = float((got.carry - want.carry).abs().max()) / scale
            if error > 1e-5:
                sys.exit(f"{where}: carry differs by {error:.2e} of its largest entry")
        elif got.carry is not None:
            sys.exit(f"{where}: a carry without a projector")
    if not torch.equal(kernel_bits.view_as(bits)[-proxy.shape[1] :], bits[-proxy.shape[1] :]):
        sys.exit(f"{case}: A's rows were written")
    if torch.equal(kernel_bits.view_as(bits), bits):
        sys.exit(f"{case}: nothing was merged")


def _rounding_sweep() -> None:
    """Nearest rounding of every E4M3 midpoint and its neighbours (both signs), and of every code
    kept as it is (a zero update), against torch's cast."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # finite magnitudes, 0 … 448
    values = codes.view(fp8.E4M3).float()
    mids = (values[:-1] + values[1:]) / 2
    targets = torch.cat(
        [mids, torch.nextafter(mids, torch.zeros(())), torch.nextafter(mids, values[1:]), values]
    )
    targets = torch.cat([targets, -targets])
    in_features = 64
    rows = -(-targets.numel() // in_features)
    targets = torch.cat([targets, torch.zeros(rows * in_features - targets.numel())]).view(
        rows, in_features
    )
    # W = 0 and rank 1 with A = 1: each element's update is its target exactly
    bits = torch.zeros(rows + 1, in_features, dtype=torch.uint8)
    bits[rows] = fp8.to_bits(torch.ones(in_features).to(fp8.E4M3))
    adapter_q = torch.ones(1, in_features)
    for stochastic in (False, True):
        rounding = Rounding(stochastic=stochastic, seed=1, step=2)
        for column in range(0, in_features, 16):
            proxy = targets[:, column : column + 1].contiguous()
            got, want = bits.clone(), bits.clone()
            _merge("triton", got, 0, proxy, adapter_q, rounding, None)
            _merge("torch", want, 0, proxy, adapter_q, rounding, None)
            if not torch.equal(got, want):
                sys.exit(
                    f"rounding sweep (stochastic={stochastic}): {int((got != want).sum())} bytes differ"
                )


def main() -> None:
    _rounding_sweep()
    cases = 0
    for out, in_features, rank in ((80, 200, RANK), (67, 130, 16), (40, 64, 5)):
        bits, proxy, adapter_q = _inputs(out, in_features, rank, seed=out)
        for stochastic in (False, True):
            rounding = Rounding(stochastic=stochastic, seed=3, step=7)
            for carry in (False, True):
                for world in (1, 3, 7):
                    case = f"{out}x{in_features} r{rank} stochastic={stochastic} carry={carry}"
                    _check(case, bits, proxy, adapter_q, rounding, carry, world)
                    cases += 1
    print(f"OK: {cases} cases and the rounding sweep")


if __name__ == "__main__":
    main()
