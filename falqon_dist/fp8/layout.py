"""Operand layouts for FP8 GEMM kernels: alignment padding and a cached transposed weight.

FP8 tensor-core GEMMs (cuBLASLt, which both ``torch._scaled_mm`` and Transformer Engine call) want
both operands K-major — ``a`` (M × K) row-major and ``b`` (K × N) column-major, the "TN" layout, the
only one Hopper runs in FP8 — and every dimension a multiple of 16. Anything else is copied first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def round_up(n: int, multiple: int = 16) -> int:
    """The smallest multiple of ``multiple`` that is ≥ ``n``."""
    return -(-n // multiple) * multiple


def pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor at the bottom/right (FP8 padding goes through its uint8 bits)."""
    pad_r, pad_c = rows - x.shape[0], cols - x.shape[1]
    if pad_r == 0 and pad_c == 0:
        return x
    return F.pad(x.view(torch.uint8), (0, pad_c, 0, pad_r)).view(x.dtype)


class TransposedBitsCache:
    """A row-major copy of ``Wᵀ`` (FP8 bits) for the backward GEMM ``∂L/∂x = g · W``.

    In that GEMM ``W`` (out × in, row-major) is the ``b`` operand, which the FP8 kernels need
    column-major: without this cache every backward pass copies ``Wᵀ`` (out·in bytes, transient).
    Keeping it costs one more byte per backbone parameter for as long as the layer lives — the FP8
    backbone then takes about as much memory as a bf16 one — so it is opt-in. The owner must call
    :meth:`invalidate` whenever the weight bytes change after the first backward pass (proxy merge,
    state-dict load); writes before it (conversion, DeepSpeed's initial broadcast) need nothing, as
    the copy is built lazily. :meth:`get` also rebuilds on a change of device or shape. Not for
    ZeRO-3: the cached copy would be a full, unpartitioned ``Wᵀ`` on every rank.
    """

    def __init__(self) -> None:
        self._bits: torch.Tensor | None = None

    def get(self, weight_bits: torch.Tensor) -> torch.Tensor:
        """``weight_bits`` (out × in, uint8) → the cached (in × out) row-major transpose."""
        cached = self._bits
        expected = (weight_bits.shape[1], weight_bits.shape[0])
        if cached is None or cached.device != weight_bits.device or tuple(cached.shape) != expected:
            self._bits = cached = weight_bits.t().contiguous()
        return cached

    def update_rows_(self, rows: torch.Tensor, row_bits: torch.Tensor) -> None:
        """Rows ``rows`` of ``W`` now hold ``row_bits`` (k × in): write them into the cached columns.

        O(k·in) bytes instead of a rebuild of the whole copy; nothing to do before the first build.
        """
        if self._bits is not None:
            self._bits.index_copy_(1, rows.to(self._bits.device), row_bits.t())

    def invalidate(self) -> None:
        self._bits = None

    @property
    def nbytes(self) -> int:
        """Bytes held now (0 until the first backward pass that needs ``∂L/∂x``)."""
        return 0 if self._bits is None else self._bits.numel() * self._bits.element_size()
