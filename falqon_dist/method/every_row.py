"""The every-row merge (``merge="every_row"``, the default) in tiles: no out × in temporary, ever.

For every W row ``j`` of ``M_q`` (scaled FP8 domain, see :mod:`falqon_dist.method.merge_math`):

    W_q,j ← Q(clamp(W_q,j + B_j·A_q, ±448)),    C_j = R_j·P   (the carry, when a projector is given)

As first written this was two whole-matrix GEMMs with the fp32 update ``U = B·A_q`` and the
residual ``R`` (out × in each) going out to memory and back: ~18 bytes moved per backbone element.
Here it runs tile by tile: a tile is ``T`` consecutive W rows (:func:`tile_rows`: its fp32 update
within :data:`TILE_BYTES`), whose update, rounding, residual and carry rows are computed before the
next tile starts. Two implementations, one result:

* on CUDA with Triton installed, ONE kernel (:mod:`falqon_dist.method.merge_kernel`) reads each
  FP8 byte once and writes it once (~2 B per element), the update and the residual living in
  registers;
* everywhere else, the tiles below in torch: the CPU path, and the reference the kernel is tested
  against (under Triton's interpreter on CPU, and on the GPU tier).

**The same bytes for any tiling and any partitioning.** The bytes depend on ``U`` only, and ``U``
is computed per *canonical* tile (its rows fixed by ``out`` and ``in`` alone), each element an fp32
multiply-add chain over ``k = 0 … r−1``; that is what the CPU GEMM computes for these shapes (and
what the bytes of the untiled merge were: tested), and what the kernel's fp32 dot computes. A
ZeRO-3 rank that holds a slice of ``M_q`` computes only the tiles its slice touches, with the same
GEMM shapes as a single process, so its bytes are the single process's. Its carry is the slice's
partial projection (rows cut by the slice boundary get the rest from the other slices: the caller
all-reduces ``Σ_slices R_slice·P = R·P``).

No host synchronization: the tiles are Python integers, everything else a device op.
"""

from __future__ import annotations

from typing import cast

import torch

from falqon_dist.fp8.cast import CompiledVariants, compiled_kernels_apply, run_compiled
from falqon_dist.method import merge_kernel
from falqon_dist.method.merge_math import (
    MergeStats,
    RowMerge,
    _merge_rows,
    merged_row_bits,
    project_onto_adapter,
    row_updates,
    rows_merged,
)
from falqon_dist.method.rounding import NEAREST, Rounding

#: The most a tile's fp32 update may take; the merge's other temporaries are the same size or
#: smaller (int64 element indices for stochastic rounding: twice it), so none exceeds 16 MiB.
TILE_BYTES = 4 << 20

MERGE_KERNELS = ("auto", "triton", "torch")
_kernel = "auto"


def set_merge_kernel(name: str) -> None:
    """Select the every-row merge in this process: ``auto`` (Triton on CUDA when installed, else
    torch tiles), ``triton`` (fail if it cannot run) or ``torch`` (the tiles, also on CUDA)."""
    global _kernel
    if name not in MERGE_KERNELS:
        raise ValueError(f"merge kernel must be one of {MERGE_KERNELS}, got {name!r}")
    _kernel = name


def _use_triton(flat: torch.Tensor) -> bool:
    if _kernel == "torch":
        return False
    if _kernel == "triton":
        merge_kernel.require()
        return True
    return flat.is_cuda and merge_kernel.available()


def tile_rows(out_features: int, in_features: int) -> int:
    """Rows per canonical tile: a multiple of 8 whose fp32 update fits :data:`TILE_BYTES`
    (at least 8 rows), balanced so that the last tile is not a sliver; ``out_features`` when the
    whole update fits. A pure function of the shape: every rank and every run tiles alike."""
    budget = max(8, (TILE_BYTES // (4 * in_features)) // 8 * 8)
    if out_features <= budget:
        return out_features
    tiles = -(-out_features // budget)
    per_tile = -(-out_features // tiles)
    return -(-per_tile // 8) * 8


def merge_every_row_(
    flat: torch.Tensor,
    offset: int,
    proxy: torch.Tensor,
    adapter_q: torch.Tensor,
    rounding: Rounding = NEAREST,
    *,
    projector: torch.Tensor | None = None,
) -> RowMerge:
    """Merge every row of B (``proxy``, out × r) into the W elements that ``flat`` holds, in place.

    ``flat`` holds elements ``[offset, offset + flat.numel())`` of the row-major ``M_q``
    ((out + r) × in): a whole ``M_q`` at offset 0, or one ZeRO-3 rank's slice. Elements of A's rows
    are left as they are. Returns the statistics (counted over the elements written; rows over
    all of B, the same on every rank), the written W elements (``bits``: out × in for a whole
    ``M_q``, else the slice's W part, flat) and the carry (out × r: the slice's partial projection,
    zero on rows the slice does not reach) or None.
    """
    out, in_features = proxy.shape[0], adapter_q.shape[1]
    flat = flat.view(-1)
    device = flat.device
    lo, hi = (
        offset,
        min(offset + flat.numel(), out * in_features),
    )  # the W elements held, flat in M_q
    proxy, adapter_q = proxy.to(device).float(), adapter_q.to(device).float()
    rows = rows_merged(proxy)
    if hi <= lo:  # only A rows here: nothing written, nothing counted but B's rows
        zero = torch.zeros((), dtype=torch.int64, device=device)
        carry = (
            None
            if projector is None
            else torch.zeros(out, proxy.shape[1], dtype=torch.float32, device=device)
        )
        return RowMerge(MergeStats(rows, zero, zero, zero, zero, layers=1), flat[:0], carry)
    projector = None if projector is None else projector.to(device).float()
    merge = merge_kernel.merge_every_row_ if _use_triton(flat) else _merge_tiles_
    carry, counts = merge(flat, offset, lo, hi, proxy, adapter_q, rounding, projector)
    stats = MergeStats.from_counts((rows, *counts), layers=1)
    written = flat[lo - offset : hi - offset]
    if lo == 0 and hi == out * in_features:
        written = written.view(out, in_features)
    return RowMerge(stats, written, carry)


def _merge_tile(
    held: torch.Tensor,
    proxy_rows: torch.Tensor,
    adapter_q: torch.Tensor,
    noise: torch.Tensor | None,
    projector: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """One tile of whole rows, in place: its update GEMM, the element-wise merge written into
    ``held``, the carry GEMM, the counts. The eager reference of the compiled tile below."""
    merged = _merge_rows(held, row_updates(proxy_rows, adapter_q), noise, None)
    held.copy_(merged[0])
    carry = None if projector is None else project_onto_adapter(merged[1], projector)
    return carry, *merged[2:]


# One function per (rounding, carry) variant (see fp8.cast.CompiledVariants): a tile is ONE call,
# not a dozen eager ops, which is what the merge of a small layer costs.
def _tile_nearest(held, proxy_rows, adapter_q):
    return _merge_tile(held, proxy_rows, adapter_q, None, None)


def _tile_nearest_carry(held, proxy_rows, adapter_q, projector):
    return _merge_tile(held, proxy_rows, adapter_q, None, projector)


def _tile_stochastic(held, proxy_rows, adapter_q, noise):
    return _merge_tile(held, proxy_rows, adapter_q, noise, None)


def _tile_stochastic_carry(held, proxy_rows, adapter_q, noise, projector):
    return _merge_tile(held, proxy_rows, adapter_q, noise, projector)


_COMPILED_TILES = CompiledVariants(
    {
        (False, False): _tile_nearest,
        (False, True): _tile_nearest_carry,
        (True, False): _tile_stochastic,
        (True, True): _tile_stochastic_carry,
    }
)


def _merge_whole_tile_(
    held, proxy_rows, adapter_q, noise, projector
) -> tuple[torch.Tensor | None, ...]:
    """:func:`_merge_tile`, compiled as one graph where the compiled kernels apply (same bytes)."""
    eager = lambda: _merge_tile(held, proxy_rows, adapter_q, noise, projector)  # noqa: E731
    if not compiled_kernels_apply(held, proxy_rows):
        return eager()
    inputs = [t for t in (noise, projector) if t is not None]
    compiled = _COMPILED_TILES[noise is not None, projector is not None]
    return run_compiled(compiled, eager, held, proxy_rows, adapter_q, *inputs, what="proxy merge")


def _merge_tiles_(
    flat: torch.Tensor,
    offset: int,
    lo: int,
    hi: int,
    proxy: torch.Tensor,
    adapter_q: torch.Tensor,
    rounding: Rounding,
    projector: torch.Tensor | None,
) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...]]:
    """The torch tiles: per canonical tile, the update GEMM, the element-wise merge of the rows the
    slice holds (written in place; a row cut by the slice boundary through a padded copy whose
    elements outside the slice are neither written nor counted) and their carry GEMM. Returns the
    carry and the counts (saturated, nonfinite, changed, elements)."""
    out, rank = proxy.shape
    in_features, device = adapter_q.shape[1], flat.device
    first, last = lo // in_features, (hi - 1) // in_features  # the rows the slice touches
    tile = tile_rows(out, in_features)
    carry = (
        None if projector is None else torch.zeros(out, rank, dtype=torch.float32, device=device)
    )
    counts: tuple[torch.Tensor, ...] | None = None
    for start in range(first // tile * tile, last + 1, tile):
        stop = min(start + tile, out)
        a, b = max(start, first), min(stop, last + 1)  # this tile's rows that the slice touches
        e_lo, e_hi = max(lo, a * in_features), min(hi, b * in_features)
        noise = rounding.noise_for_rows(torch.arange(a, b, device=device), in_features, device)
        whole_tile = (a, b) == (start, stop) and (e_lo, e_hi) == (a * in_features, b * in_features)
        if whole_tile:
            held = flat[e_lo - offset : e_hi - offset].view(b - a, in_features)
            tile_carry, *tile_counts = _merge_whole_tile_(
                held, proxy[start:stop], adapter_q, noise, projector
            )
            if carry is not None:
                carry[a:b] = cast(torch.Tensor, tile_carry)
            part = tuple(cast(list[torch.Tensor], tile_counts))
            counts = part if counts is None else tuple(x + y for x, y in zip(counts, part))
            continue
        # part of a tile (a ZeRO-3 slice boundary): the whole tile's GEMM, whatever the slice
        update = row_updates(proxy[start:stop], adapter_q)[a - start : b - start]
        if e_lo == a * in_features and e_hi == b * in_features:  # whole rows: merged in place
            held = flat[e_lo - offset : e_hi - offset].view(b - a, in_features)
            merged = merged_row_bits(held, update, noise)
            held.copy_(merged.bits)
            residual = merged.residual
        else:  # a row the slice boundary cuts
            padded = torch.zeros((b - a) * in_features, dtype=torch.uint8, device=device)
            padded[e_lo - a * in_features : e_hi - a * in_features] = flat[
                e_lo - offset : e_hi - offset
            ]
            index = torch.arange(a * in_features, b * in_features, device=device)
            owned = ((index >= e_lo) & (index < e_hi)).view(b - a, in_features)
            merged = merged_row_bits(padded.view(b - a, in_features), update, noise, owned)
            flat[e_lo - offset : e_hi - offset] = merged.bits.view(-1)[
                e_lo - a * in_features : e_hi - a * in_features
            ]
            residual = torch.where(owned, merged.residual, 0.0)
        if carry is not None and projector is not None:
            carry[a:b] = project_onto_adapter(residual, projector)
        part = (merged.saturated, merged.nonfinite, merged.changed, merged.elements)
        counts = part if counts is None else tuple(x + y for x, y in zip(counts, part))
    assert counts is not None, "a slice holds at least one element (the caller returns early)"
    return carry, counts
