"""The row-wise proxy update that merges B into the FP8 backbone, and THE merge primitive.

With row magnitudes ``m_j = Σ_k |B_jk|`` and ``T`` the top-k rows of ``m``, in the scaled FP8 domain

    M_q[T] ← Q(clamp(M_q[T] + B[T] · M_q[out:], ±448))

W and A share the scale ``s``, so ``s·(W_q,j + B_j A_q) = W_j + B_j A`` needs no rescale. Here ``B``
is the proxy in *real* units per unit of ``o_A`` — because ``o_A = x Aᵀ`` already carries ``s``, the
update to ``W_q`` is ``B_j · A_q`` exactly. Elements whose sum leaves ``±448`` are clamped and counted
as ``saturated``. An element whose sum is not finite (a NaN or ±inf in B) keeps its old bits and is
counted as ``nonfinite``: FALQON writes into the backbone, so a NaN there would be permanent.
``Q`` rounds to nearest (the paper) or stochastically (:mod:`falqon_dist.method.rounding`).

**Merging every row** (``rows=None``: the layer's ``merge="every_row"``, the default, and the final
fold): ``T`` is all of W's rows, so nothing is sorted, gathered or scattered, and the merge runs in
tiles or as one kernel (:mod:`falqon_dist.method.every_row`). B then holds at most the carry, and the backbone follows
``W_0 + Σ_t ΔB_t·A`` up to one FP8 rounding, as LoRA with A frozen would.

**Carrying what rounding drops** (a ``projector`` given: the recipes ``every_row`` and ``topk_carry``):
the residual of a merged row, ``R_j = (W_q,j + B_j A_q) − Q(W_q,j + B_j A_q)`` (zero where the sum
clamped or was not finite), is what FP8 rounded away. Its least-squares projection onto A's rows,

    C_j = R_j · P,   P = A_qᵀ (A_q A_qᵀ + εI)⁻¹      (in × r, computed once per layer: A is frozen)

goes back into B instead of zero, so an update too small to move a single FP8 byte is not lost but
accumulates until it does (error feedback).

**No host synchronization.** Every step is a fixed-shape device operation (sort, gather, matmul,
scatter); nothing is read back to the host. Statistics are 0-dim device tensors
(:class:`~falqon_dist.method.merge_math.MergeStats`), read once when they are logged.

Every writer calls :func:`merge_slice_` (B into the elements ``[offset, offset + n)`` of the
row-major ``M_q`` that a flat tensor holds), which takes one of four paths:

* every row, whole ``M_q`` or a ZeRO-3 slice: :func:`falqon_dist.method.every_row.merge_every_row_`
  (each element needs only its own byte: nothing is gathered; a slice computes only its tiles);
* top-k rows of a whole ``M_q`` (a single process, replicas under ZeRO 0–2): gather the k rows,
  merge, scatter them back;
* top-k rows into one rank's slice (ZeRO-3), given the full current bits of the k rows: only the
  elements inside the slice change, and the bytes (and the carry) equal the unsharded merge's.
"""

from __future__ import annotations

import torch

from falqon_dist.method.every_row import merge_every_row_
from falqon_dist.method.merge_math import (
    MergedRows,
    RowMerge,
    merge_stats,
    merged_row_bits,
    project_onto_adapter,
    row_updates,
)
from falqon_dist.method.rounding import NEAREST, Rounding


def select_rows(proxy: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` rows of ``proxy`` with the largest ``Σ_k |B_jk|``, sorted ascending.

    Deterministic for identical inputs (the same on every rank); ties keep the lower index. A NaN
    magnitude sorts first (and its row is then left unchanged by the non-finite guard).
    """
    magnitude = proxy.detach().float().abs().sum(dim=1)
    k = min(k, magnitude.numel())
    # A stable descending sort makes tie-breaking explicit and identical everywhere.
    order = torch.sort(magnitude, descending=True, stable=True).indices[:k]
    return order.sort().values


def _merge(
    old_rows: torch.Tensor,
    rows: torch.Tensor,
    proxy_rows: torch.Tensor,
    adapter_q: torch.Tensor,
    rounding: Rounding,
    owned: torch.Tensor | None = None,
) -> MergedRows:
    """:func:`merged_row_bits` of the gathered rows ``rows`` (their bits ``old_rows``, k × in) of ``M_q``."""
    device = old_rows.device
    noise = rounding.noise_for_rows(rows, old_rows.shape[1], device)
    return merged_row_bits(
        old_rows, row_updates(proxy_rows.to(device), adapter_q.to(device)), noise, owned
    )


def _carry(merged: MergedRows, projector: torch.Tensor | None) -> torch.Tensor | None:
    return None if projector is None else project_onto_adapter(merged.residual, projector)


def _merge_top_rows_(
    bits: torch.Tensor,
    rows: torch.Tensor,
    proxy_rows: torch.Tensor,
    adapter_q: torch.Tensor,
    rounding: Rounding = NEAREST,
    *,
    projector: torch.Tensor | None = None,
) -> RowMerge:
    """Merge ``proxy_rows`` (k × r) into rows ``rows`` of ``bits``, the W rows of ``M_q`` (out × in):
    gather, merge, scatter."""
    rows = rows.to(bits.device)
    merged = _merge(bits.index_select(0, rows), rows, proxy_rows, adapter_q, rounding)
    bits.index_copy_(0, rows, merged.bits)
    return RowMerge(merge_stats(proxy_rows, merged), merged.bits, _carry(merged, projector))


def _merge_rows_into_slice_(
    flat: torch.Tensor,
    offset: int,
    rows: torch.Tensor,
    old_rows: torch.Tensor,
    proxy_rows: torch.Tensor,
    adapter_q: torch.Tensor,
    rounding: Rounding = NEAREST,
    *,
    projector: torch.Tensor | None = None,
) -> RowMerge:
    """The same merge on a flat slice: ``flat`` holds elements ``[offset, offset + n)`` of ``M_q``.

    ``old_rows`` (k × in) are the full current bits of ``rows`` (the caller gathers them from the
    slices), so the merged rows, and the carry, are exactly the unsharded merge's on every rank.
    Only elements inside the slice are written and counted. Sync-free: every merged element is
    written at its index clamped into the slice; positions outside it land on the slice's first or
    last element and write exactly the value that element ends up with (its merged value when its
    row is selected, else its old bits), so every duplicate write carries the same byte and the
    result does not depend on write order.
    """
    n, device = flat.numel(), flat.device
    rows = rows.to(device)
    in_features = old_rows.shape[1]
    local = rows.unsqueeze(1) * in_features + torch.arange(in_features, device=device) - offset
    inside = (local >= 0) & (local < n)  # the merged elements this slice holds (and counts)
    merged = _merge(old_rows.to(device), rows, proxy_rows, adapter_q, rounding, inside)
    if n == 0 or rows.numel() == 0:
        return RowMerge(merge_stats(proxy_rows, merged), merged.bits, _carry(merged, projector))
    clamped = local.clamp(0, n - 1)
    new_flat = merged.bits.reshape(-1)

    def final_value(position: int) -> torch.Tensor:
        """What local ``position`` holds after the merge, as a (1,) uint8 tensor."""
        row, col = divmod(offset + position, in_features)
        wanted = torch.full(
            (1,), row, device=device, dtype=rows.dtype
        )  # a fill, not a host-to-device copy
        slot = torch.searchsorted(rows, wanted).clamp_(max=rows.numel() - 1)
        selected = rows.index_select(0, slot) == row
        chosen = new_flat.index_select(0, slot * in_features + col)
        return torch.where(selected, chosen, flat[position : position + 1])

    fill = torch.where(local < 0, final_value(0), final_value(n - 1))
    flat.index_put_((clamped.reshape(-1),), torch.where(inside, merged.bits, fill).reshape(-1))
    return RowMerge(merge_stats(proxy_rows, merged), merged.bits, _carry(merged, projector))


def merge_slice_(
    flat: torch.Tensor,
    offset: int,
    proxy: torch.Tensor,
    rows: torch.Tensor | None,
    adapter_q: torch.Tensor,
    rounding: Rounding = NEAREST,
    *,
    old_rows: torch.Tensor | None = None,
    projector: torch.Tensor | None = None,
) -> RowMerge:
    """THE merge primitive: merge B into the elements ``[offset, offset + flat.numel())`` of the
    row-major ``M_q`` ((out + r) × in) that ``flat`` holds, in place.

    ``proxy`` is all of B (out × r: ``FalqonLinear.B`` or its fp32 master); ``rows`` the W rows to
    merge (k, sorted: :func:`select_rows`), None for every row. Every writer calls this one function:
    a whole ``M_q`` (a single process, ZeRO 0–2 replicas, a ZeRO-3 parameter kept resident) is the
    slice at offset 0 and is merged in place without a scatter; a ZeRO-3 partition is its rank's
    slice, written without gathering W (every row) or given ``old_rows``, the full current bits of
    ``rows`` that the caller gathered from the slices (a top-k merge). The bytes of every slice,
    and the carry, equal the whole merge's (see the module docstring for each case).
    """
    out, in_features = proxy.shape[0], adapter_q.shape[1]
    if rows is None:  # every row: in place, tile by tile, nothing gathered
        return merge_every_row_(flat, offset, proxy, adapter_q, rounding, projector=projector)
    proxy_rows = proxy.index_select(0, rows.to(proxy.device))
    if offset == 0 and flat.numel() >= out * in_features:  # every W row is here, whole
        w_rows = flat.view(-1)[: out * in_features].view(out, in_features)
        return _merge_top_rows_(w_rows, rows, proxy_rows, adapter_q, rounding, projector=projector)
    flat = flat.view(-1)
    if old_rows is None:
        raise ValueError(
            "merge_slice_: a top-k merge into a slice that does not hold the W rows needs their "
            "current bits (old_rows, k x in)"
        )
    return _merge_rows_into_slice_(
        flat,
        offset,
        rows.to(flat.device),
        old_rows,
        proxy_rows,
        adapter_q,
        rounding,
        projector=projector,
    )
