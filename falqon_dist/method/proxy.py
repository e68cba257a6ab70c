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

**Merging every row** (``rows=None``, the layer's ``topk="all"``): ``T`` is all of W's rows, so no
row waits in B and nothing is sorted, gathered or scattered. B then holds at most the carry (below
one FP8 step of each merged element), which the forward does not need: the layer costs exactly the
paper's GEMMs, and the backbone follows ``W_0 + Σ_t ΔB_t·A`` up to one FP8 rounding, as LoRA with
A frozen would.

**Carrying what rounding drops** (a ``projector`` given, for ``unmerged="keep"`` or ``topk="all"``):
the residual of a merged row, ``R_j = (W_q,j + B_j A_q) − Q(W_q,j + B_j A_q)`` (zero where the sum
clamped or was not finite), is what FP8 rounded away. Its least-squares projection onto A's rows,

    C_j = R_j · P,   P = A_qᵀ (A_q A_qᵀ + εI)⁻¹      (in × r, computed once per layer: A is frozen)

goes back into B instead of zero, so an update too small to move a single FP8 byte is not lost but
accumulates until it does (error feedback): a row whose update rounds away entirely gets its
``B_j`` back (up to ε).

**No host synchronization.** Every step below is a fixed-shape device operation (sort, gather,
matmul, scatter); nothing is read back to the host. Statistics are 0-dim device tensors
(:class:`MergeStats`), read once when they are logged. On a GPU the merge of a layer is then a
short, asynchronous stream of small kernels whatever the number of layers.

Every writer calls one primitive, :func:`merge_slice_` (B into the elements ``[offset, offset + n)``
of the row-major ``M_q`` that a flat tensor holds), which takes one of three paths around the
element-wise kernel :func:`merged_row_bits`:

* the slice holds every W row (a whole ``M_q``: a single process, replicas under ZeRO 0–2): gather
  the k rows, merge, scatter them back, or merge every row in place (:func:`merge_every_row_`, one
  compiled graph with the update and carry GEMMs);
* a top-k merge into one rank's slice (ZeRO-3), given the full current bits of the k rows: only the
  elements inside the slice change, and the bytes (and the carry) equal the unsharded merge's;
* every row into one rank's slice (ZeRO-3): each element needs only its own byte, so nothing is
  gathered; the bytes equal the unsharded merge's, the carry is a per-slice partial sum for the
  caller to all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from falqon_dist.fp8 import E4M3, E4M3_MAX, to_bits
from falqon_dist.fp8.cast import CompiledVariants, compiled_kernels_apply, run_compiled

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

    def noise_for_rows(self, rows: torch.Tensor, in_features: int, device: torch.device) -> torch.Tensor | None:
        """Noise for every element of ``rows`` of ``M_q`` (k × in), or None for nearest rounding,
        which never builds the k × in element indices."""
        if not self.stochastic:
            return None
        return self.noise(rows.to(device).unsqueeze(1) * in_features + torch.arange(in_features, device=device))


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
    """k merged rows: their new E4M3 ``bits`` (k × in, uint8), the ``residual`` (k × in, float32,
    scaled domain) that rounding dropped, zero where the sum clamped or was not finite, and the
    counts (0-dim int64) over the owned elements: ``saturated``, ``nonfinite``, ``changed`` (bytes
    that differ from the old ones) and ``elements``."""

    bits: torch.Tensor
    residual: torch.Tensor
    saturated: torch.Tensor
    nonfinite: torch.Tensor
    changed: torch.Tensor
    elements: torch.Tensor


def _merge_rows(
    old_bits: torch.Tensor, update: torch.Tensor, noise: torch.Tensor | None, owned: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """The eager reference of :func:`merged_row_bits` (and what ``torch.compile`` traces)."""
    old = old_bits.view(E4M3).float()
    target = old + update
    finite = torch.isfinite(target)
    saturated = finite & (target.abs() > E4M3_MAX)
    updated = torch.where(finite, target.clamp(-E4M3_MAX, E4M3_MAX), old)
    rounded = updated.to(E4M3) if noise is None else stochastic_round_e4m3(updated, noise)
    new_bits = to_bits(rounded)
    residual = torch.where(finite & ~saturated, updated - rounded.float(), 0.0)
    nonfinite, changed = ~finite, new_bits != old_bits
    if owned is None:
        elements = torch.full((), old_bits.numel(), dtype=torch.int64, device=old_bits.device)  # a fill: no copy
    else:
        saturated, nonfinite, changed, elements = saturated & owned, nonfinite & owned, changed & owned, owned
    return new_bits, residual, saturated.sum(), nonfinite.sum(), changed.sum(), elements.sum()


# One function per (rounding, owned) variant (see fp8.cast.CompiledVariants).
def _merge_nearest(old_bits, update):
    return _merge_rows(old_bits, update, None, None)


def _merge_nearest_owned(old_bits, update, owned):
    return _merge_rows(old_bits, update, None, owned)


def _merge_stochastic(old_bits, update, noise):
    return _merge_rows(old_bits, update, noise, None)


def _merge_stochastic_owned(old_bits, update, noise, owned):
    return _merge_rows(old_bits, update, noise, owned)


_COMPILED_MERGES = CompiledVariants({
    (False, False): _merge_nearest,
    (False, True): _merge_nearest_owned,
    (True, False): _merge_stochastic,
    (True, True): _merge_stochastic_owned,
})


def merged_row_bits(
    old_bits: torch.Tensor,
    update: torch.Tensor,
    noise: torch.Tensor | None = None,
    owned: torch.Tensor | None = None,
) -> MergedRows:
    """The merged E4M3 bits of k rows: ``Q(clamp(W_q + U, ±448))``, non-finite sums keep ``W_q``.

    ``old_bits`` (k × in, uint8), ``update`` (k × in, float32, scaled domain: ``U = B·A_q`` of those
    rows, computed by the caller so that every writer takes it from the same GEMM), ``noise``
    (k × in uniform [0, 1) for stochastic rounding, or None for nearest), ``owned`` (k × in bool:
    the elements to count; None = all). With the compiled kernels (``fp8.cast=compiled``, the
    default) this is one fused pass — read a byte and the update, write a byte and the residual,
    reduce the counts — instead of ~15 eager ops each over the k × in block; the bits are the same.
    """
    extra = [t for t in (noise, owned) if t is not None]
    eager = lambda: _merge_rows(old_bits, update, noise, owned)  # noqa: E731
    if not compiled_kernels_apply(old_bits):
        return MergedRows(*eager())
    compiled = _COMPILED_MERGES[noise is not None, owned is not None]
    return MergedRows(*run_compiled(compiled, eager, old_bits, update, *extra, what="proxy merge"))


def row_updates(proxy_rows: torch.Tensor, adapter_q: torch.Tensor) -> torch.Tensor:
    """``U = B_rows · A_q`` (k × in, float32): what a merge adds to those rows in the scaled domain."""
    return proxy_rows.float() @ adapter_q.float()


def adapter_projector(adapter_q: torch.Tensor) -> torch.Tensor:
    """``P = A_qᵀ (A_q A_qᵀ + εI)⁻¹`` (in × r, float32): ``R·P`` is the least-squares ``C`` of ``C·A_q ≈ R``.

    ``ε`` (1e-6 of the Gram matrix's mean diagonal) keeps the r × r system positive definite for any
    A (a Cholesky that could fail would need a host check); entries that still come out non-finite
    are zero. A never changes during training, so a layer computes ``P`` once (see
    ``FalqonLinear.adapter_projector``). Sync-free.
    """
    adapter = adapter_q.float()
    gram = adapter @ adapter.T
    ridge = gram.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny) * 1e-6
    gram = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    factor, _ = torch.linalg.cholesky_ex(gram)  # the info flag is not read: no host sync
    projector = torch.cholesky_solve(adapter, factor).T
    return torch.where(torch.isfinite(projector), projector, 0.0)


def project_onto_adapter(residual: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """``C = R·P`` (k × r): the coefficients on A's rows that best reproduce ``R`` (k × in);
    non-finite entries are zero, so the carry can never put a NaN into B."""
    carry = residual.float() @ projector.to(residual.device)
    return torch.where(torch.isfinite(carry), carry, 0.0)


def _merge_every_row(
    weight_bits: torch.Tensor, proxy: torch.Tensor, adapter_q: torch.Tensor, noise: torch.Tensor | None,
    projector: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """The eager reference of :func:`merge_every_row_` (and what ``torch.compile`` traces)."""
    merged = _merge_rows(weight_bits, row_updates(proxy, adapter_q), noise, None)
    weight_bits.copy_(merged[0])
    carry = None if projector is None else project_onto_adapter(merged[1], projector)
    return carry, _rows_merged(proxy), *merged[2:]


# One function per (rounding, carry) variant, as for the row kernels above.
def _every_row_nearest(weight_bits, proxy, adapter_q):
    return _merge_every_row(weight_bits, proxy, adapter_q, None, None)


def _every_row_nearest_carry(weight_bits, proxy, adapter_q, projector):
    return _merge_every_row(weight_bits, proxy, adapter_q, None, projector)


def _every_row_stochastic(weight_bits, proxy, adapter_q, noise):
    return _merge_every_row(weight_bits, proxy, adapter_q, noise, None)


def _every_row_stochastic_carry(weight_bits, proxy, adapter_q, noise, projector):
    return _merge_every_row(weight_bits, proxy, adapter_q, noise, projector)


_COMPILED_EVERY_ROW = CompiledVariants({
    (False, False): _every_row_nearest,
    (False, True): _every_row_nearest_carry,
    (True, False): _every_row_stochastic,
    (True, True): _every_row_stochastic_carry,
})


def merge_every_row_(
    weight_bits: torch.Tensor,
    proxy: torch.Tensor,
    adapter_q: torch.Tensor,
    rounding: Rounding = NEAREST,
    *,
    projector: torch.Tensor | None = None,
) -> RowMerge:
    """Merge all of B (``proxy``, out × r) into the W rows ``weight_bits`` (out × in, uint8) in place.

    The merge of :func:`merged_row_bits` with its update GEMM ``U = B·A_q`` before it and the carry
    GEMM ``C = R·P`` (``projector`` given) and the counts after it, as ONE compiled graph
    (``fp8.cast=compiled``): the element-wise work, the in-place write of the new bytes and the
    reductions fuse around the two GEMMs, and the layer's merge is one call instead of a dozen
    eager ops (their per-op dispatch is what a merge of small layers costs). The bytes are the
    eager reference's; the update is the same GEMM :func:`_merge_every_row_into_slice_` takes, so a
    ZeRO-3 slice merge still writes the same bytes.
    """
    proxy, adapter_q = proxy.float(), adapter_q.to(proxy.device).float()
    device = weight_bits.device
    noise = rounding.noise_for_rows(torch.arange(weight_bits.shape[0], device=device), weight_bits.shape[1], device)
    inputs = [t for t in (noise, projector) if t is not None]
    eager = lambda: _merge_every_row(weight_bits, proxy, adapter_q, noise, projector)  # noqa: E731
    if compiled_kernels_apply(weight_bits, proxy):
        compiled = _COMPILED_EVERY_ROW[noise is not None, projector is not None]
        outputs = run_compiled(compiled, eager, weight_bits, proxy, adapter_q, *inputs, what="proxy merge")
    else:
        outputs = eager()
    carry, rows_merged, saturated, nonfinite, changed, elements = outputs
    stats = MergeStats(rows_merged, saturated, nonfinite, changed, elements, layers=1)
    return RowMerge(stats, weight_bits, carry)


def _rows_merged(proxy_rows: torch.Tensor) -> torch.Tensor:
    """How many of these rows of B are not all zero (0-dim int64)."""
    return proxy_rows.abs().sum(dim=1).gt(0).sum()


def _stats(proxy_rows: torch.Tensor, merged: MergedRows) -> MergeStats:
    """The counts of one merge (``merged`` counted its owned elements)."""
    return MergeStats(
        rows_merged=_rows_merged(proxy_rows),
        saturated=merged.saturated,
        nonfinite=merged.nonfinite,
        changed=merged.changed,
        elements=merged.elements,
        layers=1,
    )


class RowMerge(NamedTuple):
    """What a merge writer returns: the statistics, the merged rows' new bits (k × in, e.g. to update
    a cached transposed copy) and the carry (k × r, see module docstring) or None."""

    stats: MergeStats
    bits: torch.Tensor
    carry: torch.Tensor | None


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
    return merged_row_bits(old_rows, row_updates(proxy_rows.to(device), adapter_q.to(device)), noise, owned)


def _carry(merged: MergedRows, projector: torch.Tensor | None) -> torch.Tensor | None:
    return None if projector is None else project_onto_adapter(merged.residual, projector)


def _merge_whole_(
    bits: torch.Tensor,
    rows: torch.Tensor | None,
    proxy_rows: torch.Tensor,
    adapter_q: torch.Tensor,
    rounding: Rounding = NEAREST,
    *,
    projector: torch.Tensor | None = None,
) -> RowMerge:
    """Merge ``proxy_rows`` (k × r) into rows ``rows`` of ``bits``, the W rows of ``M_q`` (out × in).

    ``rows=None`` merges every W row (``proxy_rows`` is then all of B, out × r) in place, without
    the gather and scatter of a row selection (:func:`merge_every_row_`).
    """
    if rows is None:  # rows 0..out-1 in place: no gather, no scatter
        return merge_every_row_(bits[: proxy_rows.shape[0]], proxy_rows, adapter_q, rounding, projector=projector)
    rows = rows.to(bits.device)
    merged = _merge(bits.index_select(0, rows), rows, proxy_rows, adapter_q, rounding)
    bits.index_copy_(0, rows, merged.bits)
    return RowMerge(_stats(proxy_rows, merged), merged.bits, _carry(merged, projector))


def _merge_every_row_into_slice_(
    flat: torch.Tensor,
    offset: int,
    proxy: torch.Tensor,
    adapter_q: torch.Tensor,
    rounding: Rounding = NEAREST,
    *,
    projector: torch.Tensor | None = None,
) -> RowMerge:
    """Merge every W row into a flat slice: ``flat`` holds elements ``[offset, offset + n)`` of ``M_q``.

    Every element's update ``B_i·A_q[:, j]`` needs only its own old byte, B (out × r, full) and A_q:
    nothing of the backbone is gathered, and the bytes equal the unsharded merge's. Elements of the
    A rows (flat index ≥ out·in) are left as they are. The returned carry is this slice's *partial*
    projection (out × r; rows the slice does not reach are zero): a row split across slices gets
    its carry as the sum over the slices (``Σ_slices R_slice·P_slice = R·P``), which the caller
    all-reduces. ``bits`` of the returned merge are the merged rows the slice spans.
    """
    out, in_features = proxy.shape[0], adapter_q.shape[1]
    device, n = flat.device, flat.numel()
    lo, hi = offset, min(offset + n, out * in_features)  # the slice's W elements, flat
    if hi <= lo:  # no W element here: nothing written, nothing counted but the rows
        empty = merged_row_bits(torch.zeros(0, in_features, dtype=torch.uint8, device=device),
                                torch.zeros(0, in_features, device=device))
        stats = _stats(proxy, empty)
        carry = None if projector is None else torch.zeros_like(proxy, dtype=torch.float32)
        return RowMerge(stats, empty.bits, carry)
    first, last = lo // in_features, (hi - 1) // in_features  # rows the slice spans (Python ints: no sync)
    start = first * in_features  # flat index of the first spanned element
    spanned = torch.zeros((last - first + 1) * in_features, dtype=torch.uint8, device=device)
    spanned[lo - start : hi - start] = flat[lo - offset : hi - offset]  # outside the slice: +0, masked below
    elements = torch.arange(start, start + spanned.numel(), device=device)
    owned = ((elements >= lo) & (elements < hi)).view(-1, in_features)
    noise = rounding.noise(elements.view(-1, in_features))
    # the update of every row from one GEMM as in the unsharded merge (a GEMM's rows may round
    # differently with its shape), then the rows this slice spans: the same bytes for any partitioning
    update = row_updates(proxy.to(device), adapter_q.to(device))[first : last + 1]
    merged = merged_row_bits(spanned.view(-1, in_features), update, noise, owned)
    flat[lo - offset : hi - offset] = merged.bits.view(-1)[lo - start : hi - start]
    stats = _stats(proxy, merged)  # rows: all of B's, the same count on every rank
    carry = None
    if projector is not None:
        partial = project_onto_adapter(torch.where(owned, merged.residual, 0.0), projector)
        carry = torch.zeros(out, partial.shape[1], dtype=torch.float32, device=device)
        carry[first : last + 1] = partial
    return RowMerge(stats, merged.bits, carry)


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
        return RowMerge(_stats(proxy_rows, merged), merged.bits, _carry(merged, projector))
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
    return RowMerge(_stats(proxy_rows, merged), merged.bits, _carry(merged, projector))


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
    proxy_rows = proxy if rows is None else proxy.index_select(0, rows.to(proxy.device))
    if offset == 0 and flat.numel() >= out * in_features:  # every W row is here, whole
        w_rows = flat.view(-1)[: out * in_features].view(out, in_features)
        return _merge_whole_(w_rows, rows, proxy_rows, adapter_q, rounding, projector=projector)
    flat = flat.view(-1)
    if rows is None:
        return _merge_every_row_into_slice_(flat, offset, proxy, adapter_q, rounding, projector=projector)
    if old_rows is None:
        raise ValueError("merge_slice_: a top-k merge into a slice that does not hold the W rows needs their "
                         "current bits (old_rows, k x in)")
    return _merge_rows_into_slice_(flat, offset, rows.to(flat.device), old_rows, proxy_rows, adapter_q, rounding,
                                   projector=projector)
