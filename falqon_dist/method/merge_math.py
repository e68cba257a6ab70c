"""The arithmetic every proxy merge shares: the element-wise merge of rows, the update and carry
GEMMs, A's projector, and the merge's statistics.

For rows ``j`` with old E4M3 bits ``W_q,j`` and update ``U_j = B_j·A_q`` (scaled domain):

    W_q,j ← Q(clamp(W_q,j + U_j, ±448))        non-finite sums keep W_q,j
    R_j   = (W_q,j + U_j) − Q(…)               zero where the sum clamped or was not finite
    C_j   = R_j · P,  P = A_qᵀ (A_q A_qᵀ + εI)⁻¹  the carry: R's least-squares coefficients on A's rows

The writers (:mod:`falqon_dist.method.proxy` for top-k rows, :mod:`falqon_dist.method.every_row`
for every row, in tiles) call these; nothing here reads the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from falqon_dist.fp8 import E4M3, E4M3_MAX, to_bits
from falqon_dist.fp8.cast import CompiledVariants, compiled_kernels_apply, run_compiled
from falqon_dist.method.rounding import stochastic_round_e4m3

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
            setattr(
                self, name, getattr(other, name) if mine is None else mine + getattr(other, name)
            )
        self.layers += other.layers
        return self

    @classmethod
    def from_counts(
        cls, counts: torch.Tensor | tuple[torch.Tensor, ...], layers: int
    ) -> MergeStats:
        """The stats of ``counts`` (the :data:`COUNT_NAMES` in order, as :meth:`counts` gives them)."""
        return cls(**dict(zip(COUNT_NAMES, counts, strict=True)), layers=layers)

    def counts(self) -> torch.Tensor:
        """The counts in :data:`COUNT_NAMES` order as one int64 device tensor (e.g. to all-reduce)."""
        if self.rows_merged is None:
            return torch.zeros(len(COUNT_NAMES), dtype=torch.int64)
        return torch.stack([getattr(self, name) for name in COUNT_NAMES])

    def to_dict(self) -> dict[str, int]:
        """Plain integers: ONE host synchronization for all counts."""
        return {**dict(zip(COUNT_NAMES, self.counts().tolist())), "layers": self.layers}


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
    old_bits: torch.Tensor,
    update: torch.Tensor,
    noise: torch.Tensor | None,
    owned: torch.Tensor | None,
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
        elements = torch.full(
            (), old_bits.numel(), dtype=torch.int64, device=old_bits.device
        )  # a fill: no copy
    else:
        saturated, nonfinite, changed, elements = (
            saturated & owned,
            nonfinite & owned,
            changed & owned,
            owned,
        )
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


_COMPILED_MERGES = CompiledVariants(
    {
        (False, False): _merge_nearest,
        (False, True): _merge_nearest_owned,
        (True, False): _merge_stochastic,
        (True, True): _merge_stochastic_owned,
    }
)


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


def rows_merged(proxy_rows: torch.Tensor) -> torch.Tensor:
    """How many of these rows of B are not all zero (0-dim int64)."""
    return proxy_rows.abs().sum(dim=1).gt(0).sum()


def merge_stats(proxy_rows: torch.Tensor, merged: MergedRows) -> MergeStats:
    """The counts of one merge (``merged`` counted its owned elements)."""
    return MergeStats(
        rows_merged=rows_merged(proxy_rows),
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
