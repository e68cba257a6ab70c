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

**No host synchronization.** Every step below is a fixed-shape device operation (sort, gather,
matmul, scatter); nothing is read back to the host. Statistics are 0-dim device tensors
(:class:`MergeStats`), read once when they are logged. On a GPU the merge of a layer is then a
short, asynchronous stream of small kernels whatever the number of layers.

Two writers share :func:`merged_row_bits`:

* :func:`apply_rows_` — a whole ``M_q`` (replicas under ZeRO 0–2, single process): gather the k
  rows, merge, scatter them back.
* :func:`apply_rows_to_slice_` — one rank's flat slice of the row-major ``M_q`` (ZeRO-3): only the
  elements inside ``[offset, offset + n)`` change, and the bytes equal the unsharded merge's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from falqon_dist.fp8 import E4M3, E4M3_MAX, to_bits

_MASK32 = 0xFFFFFFFF
#: The counts of :class:`MergeStats`, in :meth:`MergeStats.counts` order.
COUNT_NAMES = ("rows_merged", "saturated", "nonfinite", "changed")


@dataclass
class MergeStats:
    """Totals of one merge as 0-dim int64 device tensors (no host sync until :meth:`to_dict`).

    ``rows_merged``: rows with a non-zero update; ``saturated``: elements clamped at ±448;
    ``nonfinite``: elements left unchanged because their update was NaN/inf; ``changed``: elements
    whose FP8 bits the merge actually changed (0 while rows are merged means every update was
    rounded away: the learning rate is too small for FP8); ``layers``: layers merged.
    An empty total (``MergeStats()``) holds None until the first :meth:`add_`: creating zeros on the
    host and copying them to a GPU would itself synchronize.
    """

    rows_merged: torch.Tensor | None = None
    saturated: torch.Tensor | None = None
    nonfinite: torch.Tensor | None = None
    changed: torch.Tensor | None = None
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
        """``[rows_merged, saturated, nonfinite, changed]`` as one int64 device tensor (e.g. to all-reduce)."""
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


def merged_row_bits(
    old_bits: torch.Tensor,
    proxy_rows: torch.Tensor,
    adapter_q: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The merged E4M3 bits of k rows: ``Q(clamp(W_q + B·A_q, ±448))``, non-finite sums keep ``W_q``.

    ``old_bits`` (k × in, uint8), ``proxy_rows`` (k × r), ``adapter_q`` (r × in, float32, scaled
    domain), ``noise`` (k × in uniform [0, 1) for stochastic rounding, or None for nearest).
    Returns ``(new_bits, saturated, nonfinite, changed)``: uint8 (k × in) and three boolean masks.
    """
    old = old_bits.view(E4M3).float()
    updated = old + proxy_rows.float() @ adapter_q.float()
    finite = torch.isfinite(updated)
    saturated = finite & (updated.abs() > E4M3_MAX)
    updated = torch.where(finite, updated.clamp(-E4M3_MAX, E4M3_MAX), old)
    rounded = updated.to(E4M3) if noise is None else stochastic_round_e4m3(updated, noise)
    new_bits = to_bits(rounded)
    return new_bits, saturated, ~finite, new_bits != old_bits


def _row_elements(rows: torch.Tensor, in_features: int, device: torch.device) -> torch.Tensor:
    """Flat indices into the row-major ``M_q`` of every element of ``rows`` (k × in, int64)."""
    return rows.to(device).unsqueeze(1) * in_features + torch.arange(in_features, device=device)


def _stats(proxy_rows: torch.Tensor, saturated: torch.Tensor, nonfinite: torch.Tensor, changed: torch.Tensor) -> MergeStats:
    return MergeStats(
        rows_merged=proxy_rows.abs().sum(dim=1).gt(0).sum(),
        saturated=saturated.sum(),
        nonfinite=nonfinite.sum(),
        changed=changed.sum(),
        layers=1,
    )


def apply_rows_(
    bits: torch.Tensor,
    rows: torch.Tensor,
    proxy_rows: torch.Tensor,
    adapter_q: torch.Tensor,
    rounding: Rounding = NEAREST,
) -> tuple[MergeStats, torch.Tensor]:
    """Merge ``proxy_rows`` (k × r) into rows ``rows`` of the whole ``M_q`` ``bits`` ((out+r) × in).

    Returns the statistics and the new bits of the merged rows (k × in), e.g. to update a cached
    transposed copy.
    """
    in_features = bits.shape[1]
    rows = rows.to(bits.device)
    noise = rounding.noise(_row_elements(rows, in_features, bits.device))
    new_bits, saturated, nonfinite, changed = merged_row_bits(
        bits.index_select(0, rows), proxy_rows.to(bits.device), adapter_q.to(bits.device), noise
    )
    bits.index_copy_(0, rows, new_bits)
    return _stats(proxy_rows, saturated, nonfinite, changed), new_bits


def apply_rows_to_slice_(
    flat: torch.Tensor,
    offset: int,
    in_features: int,
    rows: torch.Tensor,
    proxy_rows: torch.Tensor,
    adapter_q: torch.Tensor,
    rounding: Rounding = NEAREST,
) -> MergeStats:
    """The same merge on a flat slice: ``flat`` holds elements ``[offset, offset + n)`` of ``M_q``.

    Only elements inside the slice change; the statistics count only those. Sync-free: the k × in
    window of every selected row is gathered at indices clamped into the slice; positions outside
    it land on the slice's first or last element and write exactly the value that element ends up
    with (its merged value when its row is selected, else its old bits), so every duplicate write
    carries the same byte and the result does not depend on write order.
    """
    n = flat.numel()
    if n == 0 or rows.numel() == 0:
        nothing = torch.zeros((1, 1), dtype=torch.bool, device=proxy_rows.device)
        return _stats(proxy_rows, nothing, nothing, nothing)
    device = flat.device
    rows = rows.to(device)
    elements = _row_elements(rows, in_features, device)  # global flat indices, k × in
    local = elements - offset
    inside = (local >= 0) & (local < n)
    clamped = local.clamp(0, n - 1)
    noise = rounding.noise(elements)
    new_bits, saturated, nonfinite, changed = merged_row_bits(
        flat[clamped], proxy_rows.to(device), adapter_q.to(device), noise
    )
    new_flat = new_bits.reshape(-1)

    def final_value(position: int) -> torch.Tensor:
        """What local ``position`` holds after the merge, as a (1,) uint8 tensor."""
        row, col = divmod(offset + position, in_features)
        wanted = torch.full((1,), row, device=device, dtype=rows.dtype)  # a fill, not a host-to-device copy
        slot = torch.searchsorted(rows, wanted).clamp_(max=rows.numel() - 1)
        selected = rows.index_select(0, slot) == row
        merged = new_flat.index_select(0, slot * in_features + col)
        return torch.where(selected, merged, flat[position : position + 1])

    fill = torch.where(local < 0, final_value(0), final_value(n - 1))
    flat.index_put_((clamped.reshape(-1),), torch.where(inside, new_bits, fill).reshape(-1))
    return _stats(proxy_rows, saturated & inside, nonfinite & inside, changed & inside)
