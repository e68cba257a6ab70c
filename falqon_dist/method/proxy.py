"""The row-wise proxy update that merges B into the FP8 backbone (DESIGN.md §1).

With row magnitudes ``m_j = Σ_k |B_jk|`` and ``T`` the top-k rows of ``m``, in the scaled FP8 domain

    M_q[T] ← Q(clamp(M_q[T] + B[T] · M_q[out:], ±448))

W and A share the scale ``s``, so ``s·(W_q,j + B_j A_q) = W_j + B_j A`` needs no rescale. Here ``B``
is the proxy in *real* units per unit of ``o_A`` — because ``o_A = x Aᵀ`` already carries ``s``, the
update to ``W_q`` is ``B_j · A_q`` exactly. Elements whose sum leaves ``±448`` are clamped and counted
as ``saturated``. An element whose sum is not finite (a NaN or ±inf in B) keeps its old bits and is
counted as ``nonfinite``: FALQON writes into the backbone, so a NaN there would be permanent.

``Q`` rounds to nearest (the paper's behaviour) or, with stochastic rounding, ``v`` between
neighbouring E4M3 values ``lo < v < hi`` becomes ``hi`` with probability ``(v − lo)/(hi − lo)``, so
``E[Q(v)] = v`` and an update smaller than half an FP8 step still moves the weight on average. The
uniform noise is a counter-based hash of (layer seed, step, element index in ``M_q``): no generator
state, computed on the parameter's device, and the same bits on every rank, every device and every
ZeRO-3 partitioning.

**Carrying what rounding drops** (``carry=True``, for ``unmerged="keep"``): the residual of a merged
row, ``R_j = (W_q,j + B_j A_q) − Q(W_q,j + B_j A_q)`` (zero where the sum clamped or was not
finite), is what FP8 rounded away. Its least-squares projection onto A's rows,

    C_j = R_j A_qᵀ (A_q A_qᵀ + εI)⁻¹            (k × r, one r × r Cholesky solve)

goes back into B instead of zero, so an update too small to move a single FP8 byte is not lost but
accumulates until it does (error feedback): a row whose update rounds away entirely gets its
``B_j`` back (up to ε).

**No host synchronization.** Every step below is a fixed-shape device operation (sort, gather,
matmul, scatter); nothing is read back to the host. Statistics are 0-dim device tensors
(:class:`MergeStats`), read once when they are logged. On a GPU the merge of a layer is then a
short, asynchronous stream of small kernels whatever the number of layers.

Two writers share :func:`merged_row_bits`:

* :func:`apply_rows_` — a whole ``M_q`` (replicas under ZeRO 0–2, single process): gather the k
  rows, merge, scatter them back.
* :func:`apply_rows_to_slice_` — one rank's flat slice of the row-major ``M_q`` (ZeRO-3), given the
  full current bits of the k rows: only the elements inside ``[offset, offset + n)`` change, and
  the bytes (and the carry) equal the unsharded merge's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from falqon_dist.fp8 import E4M3, E4M3_MAX, to_bits

_MASK32 = 0xFFFFFFFF
#: The counts of :class:`MergeStats`, in :meth:`MergeStats.counts` order.
COUNT_NAMES = ("rows_merged", "saturated", "nonfinite", "changed", "elements")


@dataclass
class MergeStats:
    """Totals of one merge as 0-dim int64 device tensors (no host sync until :meth:`to_dict`).

    ``rows_merged``: rows with a non-zero update; ``saturated``: elements clamped at ±448;
    ``nonfinite``: elements left unchanged because their update was NaN/inf; ``changed``: elements
    whose FP8 bits the merge actually changed (0 while rows are merged means every update was
    rounded away: the learning rate is too small for FP8); ``elements``: elements the merge wrote
    (k × in per layer; ``saturated / elements`` is the clamped fraction); ``layers``: layers merged.
    An empty total (``MergeStats()``) holds None until the first :meth:`add_`: creating zeros on the
    host and copying them to a GPU would itself synchronize.
    """

    rows_merged: torch.Tensor | None = None
    saturated: torch.Tensor | None = None
    nonfinite: torch.Tensor | None = None
    changed: torch.Tensor | None = None
    elements: torch.Tensor | None = None
    layers: int = 0

    def add_(self, other: MergeStats) -> MergeStats:
        """Accumulate ``other`` in place."""
        if other.rows_merged is None:
            return self
        for name in COUNT_NAMES:
            mine = getattr(self, name)
            setattr(self, name, getattr(other, name) if mine is None else mine + getattr(other, name))
        self.layers += other.layers
        return self

    def counts(self) -> torch.Tensor:
        """The counts in :data:`COUNT_NAMES` order as one int64 device tensor (e.g. to all-reduce)."""
        if self.rows_merged is None:
            return torch.zeros(len(COUNT_NAMES), dtype=torch.int64)
        return torch.stack([getattr(self, name) for name in COUNT_NAMES])

    def to_dict(self) -> dict[str, int]:
        """Plain integers: ONE host synchronization for all counts."""
        return {**dict(zip(COUNT_NAMES, self.counts().tolist())), "layers": self.layers}


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


def _mul_mod32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x · constant mod 2³²`` for int64 ``x`` in [0, 2³²) without int64 overflow."""
    lo, hi = constant & 0xFFFF, constant >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function (lowbias32) on int64 tensors holding values in [0, 2³²)."""
    x = x ^ (x >> 16)
    x = _mul_mod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul_mod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash32_int(x: int) -> int:
    """:func:`_hash32` of one Python integer (for the per-merge key: no device work)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def merge_noise(seed: int, step: int, element_index: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 noise, a pure function of (seed, step, element index in ``M_q``).

    24 bits per draw (exact in float32). The same on any device, rank and partitioning.
    """
    key = _hash32_int(_hash32_int(seed) ^ _hash32_int(step + 0x9E3779B9))
    index = element_index.to(torch.int64)
    mixed = _hash32((index & _MASK32) ^ key)
    mixed = _hash32(mixed ^ (index >> 32) ^ _hash32_int(key + 1))
    return (mixed >> 8).to(torch.float32) * (1.0 / (1 << 24))


@dataclass(frozen=True)
class Rounding:
    """How a merge rounds to E4M3: to nearest (the paper), or stochastically with the noise of
    :func:`merge_noise` keyed by the layer's ``seed`` and the optimizer ``step``."""

    stochastic: bool = False
    seed: int = 0
    step: int = 0

    def noise(self, element_index: torch.Tensor) -> torch.Tensor | None:
        """Uniform noise for these elements of ``M_q``, or None for nearest rounding."""
        return merge_noise(self.seed, self.step, element_index) if self.stochastic else None


NEAREST = Rounding()


def stochastic_round_e4m3(values: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Round float32 ``values`` (within ±448) to E4M3, up with probability equal to the fraction of
    the FP8 step below them (``noise`` uniform in [0, 1), same shape). Exact values stay exact."""
    magnitude = values.abs()
    nearest = magnitude.to(E4M3)
    code = to_bits(nearest).to(torch.int16)  # non-negative codes are monotone in the magnitude
    above = nearest.float() > magnitude
    lo_code = torch.where(above, code - 1, code).clamp_(min=0)
    hi_code = torch.where(above, code, (code + 1).clamp_(max=0x7E))  # 0x7E = 448, 0x7F is NaN
    lo = lo_code.to(torch.uint8).view(E4M3).float()
    hi = hi_code.to(torch.uint8).view(E4M3).float()
    step = hi - lo
    fraction = torch.where(step > 0, (magnitude - lo) / torch.where(step > 0, step, 1.0), 0.0)
    rounded = torch.where(noise < fraction, hi, lo)
    return (rounded * values.sign()).to(E4M3)


class MergedRows(NamedTuple):
    """k merged rows: their new E4M3 ``bits`` (k × in, uint8), three boolean masks (k × in) and the
    ``residual`` (k × in, float32, scaled domain) that rounding dropped, zero where the sum clamped
    or was not finite."""

    bits: torch.Tensor
    saturated: torch.Tensor
    nonfinite: torch.Tensor
    changed: torch.Tensor
    residual: torch.Tensor


def merged_row_bits(
    old_bits: torch.Tensor,
    proxy_rows: torch.Tensor,
    adapter_q: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> MergedRows:
    """The merged E4M3 bits of k rows: ``Q(clamp(W_q + B·A_q, ±448))``, non-finite sums keep ``W_q``.

    ``old_bits`` (k × in, uint8), ``proxy_rows`` (k × r), ``adapter_q`` (r × in, float32, scaled
    domain), ``noise`` (k × in uniform [0, 1) for stochastic rounding, or None for nearest).
    """
    old = old_bits.view(E4M3).float()
    target = old + proxy_rows.float() @ adapter_q.float()
    finite = torch.isfinite(target)
    saturated = finite & (target.abs() > E4M3_MAX)
    updated = torch.where(finite, target.clamp(-E4M3_MAX, E4M3_MAX), old)
    rounded = updated.to(E4M3) if noise is None else stochastic_round_e4m3(updated, noise)
    new_bits = to_bits(rounded)
    residual = torch.where(finite & ~saturated, updated - rounded.float(), 0.0)
    return MergedRows(new_bits, saturated, ~finite, new_bits != old_bits, residual)


def project_onto_adapter(residual: torch.Tensor, adapter_q: torch.Tensor) -> torch.Tensor:
    """``C`` (k × r) minimizing ``‖C·A_q − R‖``: ``R A_qᵀ (A_q A_qᵀ + εI)⁻¹``, float32, sync-free.

    ``ε`` (1e-6 of the Gram matrix's mean diagonal) keeps the r × r system positive definite for any
    A (a Cholesky that could fail would need a host check); entries that still come out non-finite
    are zero, so the carry can never put a NaN into B.
    """
    adapter = adapter_q.float()
    gram = adapter @ adapter.T
    ridge = gram.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny) * 1e-6
    gram = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor, _ = torch.linalg.cholesky_ex(gram)  # the info flag is not read: no host sync
    carry = torch.cholesky_solve((residual.float() @ adapter.T).T, factor).T
    return torch.where(torch.isfinite(carry), carry, 0.0)


def _row_elements(rows: torch.Tensor, in_features: int, device: torch.device) -> torch.Tensor:
    """Flat indices into the row-major ``M_q`` of every element of ``rows`` (k × in, int64)."""
    return rows.to(device).unsqueeze(1) * in_features + torch.arange(in_features, device=device)


def _stats(proxy_rows: torch.Tensor, merged: MergedRows, owned: torch.Tensor | None = None) -> MergeStats:
    """The counts of one merge over the elements ``owned`` (a k × in mask; None = all merged elements)."""
    owned = torch.ones_like(merged.changed) if owned is None else owned
    return MergeStats(
        rows_merged=proxy_rows.abs().sum(dim=1).gt(0).sum(),
        saturated=(merged.saturated & owned).sum(),
        nonfinite=(merged.nonfinite & owned).sum(),
        changed=(merged.changed & owned).sum(),
        elements=owned.sum(),
        layers=1,
    )


class RowMerge(NamedTuple):
    """What a merge writer returns: the statistics, the merged rows' new bits (k × in, e.g. to update
    a cached transposed copy) and the carry (k × r, see module docstring) or None."""

    stats: MergeStats
    bits: torch.Tensor
    carry: torch.Tensor | None


def _merge(
    old_rows: torch.Tensor, rows: torch.Tensor, proxy_rows: torch.Tensor, adapter_q: torch.Tensor, rounding: Rounding
) -> MergedRows:
    """:func:`merged_row_bits` of the gathered rows ``rows`` (their bits ``old_rows``, k × in) of ``M_q``."""
    device = old_rows.device
    noise = rounding.noise(_row_elements(rows, old_rows.shape[1], device))
    return merged_row_bits(old_rows, proxy_rows.to(device), adapter_q.to(device), noise)


def _carry(merged: MergedRows, adapter_q: torch.Tensor, carry: bool) -> torch.Tensor | None:
    return project_onto_adapter(merged.residual, adapter_q.to(merged.residual.device)) if carry else None


def apply_rows_(
    bits: torch.Tensor,
    rows: torch.Tensor,
    proxy_rows: torch.Tensor,
    adapter_q: torch.Tensor,
    rounding: Rounding = NEAREST,
    *,
    carry: bool = False,
) -> RowMerge:
    """Merge ``proxy_rows`` (k × r) into rows ``rows`` of the whole ``M_q`` ``bits`` ((out+r) × in)."""
    rows = rows.to(bits.device)
    merged = _merge(bits.index_select(0, rows), rows, proxy_rows, adapter_q, rounding)
    bits.index_copy_(0, rows, merged.bits)
    stats = _stats(proxy_rows, merged)
    return RowMerge(stats, merged.bits, _carry(merged, adapter_q, carry))


def apply_rows_to_slice_(
    flat: torch.Tensor,
    offset: int,
    rows: torch.Tensor,
    old_rows: torch.Tensor,
    proxy_rows: torch.Tensor,
    adapter_q: torch.Tensor,
    rounding: Rounding = NEAREST,
    *,
    carry: bool = False,
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
    merged = _merge(old_rows.to(device), rows, proxy_rows, adapter_q, rounding)
    if n == 0 or rows.numel() == 0:
        owned_here = torch.zeros_like(merged.changed)  # this slice holds none of the merged elements
        return RowMerge(_stats(proxy_rows, merged, owned_here), merged.bits, _carry(merged, adapter_q, carry))
    in_features = old_rows.shape[1]
    local = _row_elements(rows, in_features, device) - offset
    inside = (local >= 0) & (local < n)
    clamped = local.clamp(0, n - 1)
    new_flat = merged.bits.reshape(-1)

    def final_value(position: int) -> torch.Tensor:
        """What local ``position`` holds after the merge, as a (1,) uint8 tensor."""
        row, col = divmod(offset + position, in_features)
        wanted = torch.full((1,), row, device=device, dtype=rows.dtype)  # a fill, not a host-to-device copy
        slot = torch.searchsorted(rows, wanted).clamp_(max=rows.numel() - 1)
        selected = rows.index_select(0, slot) == row
        chosen = new_flat.index_select(0, slot * in_features + col)
        return torch.where(selected, chosen, flat[position : position + 1])

    fill = torch.where(local < 0, final_value(0), final_value(n - 1))
    flat.index_put_((clamped.reshape(-1),), torch.where(inside, merged.bits, fill).reshape(-1))
    stats = _stats(proxy_rows, merged, inside)
    return RowMerge(stats, merged.bits, _carry(merged, adapter_q, carry))
