"""The row-wise proxy update that merges B into the FP8 backbone (DESIGN.md §1).

With row magnitudes ``m_j = Σ_k |B_jk|`` and ``T`` the top-k rows of ``m``, in the scaled FP8 domain

    M_q[T] ← Q(clamp(M_q[T] + B[T] · M_q[out:], ±448))

W and A share the scale ``s``, so ``s·(W_q,j + B_j A_q) = W_j + B_j A`` needs no rescale. Here ``B``
is the proxy in *real* units per unit of ``o_A`` — because ``o_A = x Aᵀ`` already carries ``s``, the
update to ``W_q`` is ``B_j · A_q`` exactly. Elements whose sum leaves ``±448`` are clamped and counted
as ``saturated``.

``Q`` rounds to nearest (the paper's behaviour) or, with ``noise`` (uniform [0, 1) per updated
element), stochastically: ``v`` between neighbouring E4M3 values ``lo < v < hi`` becomes ``hi`` with
probability ``(v − lo)/(hi − lo)``, so ``E[Q(v)] = v`` and an update smaller than half an FP8 step
still moves the weight on average instead of being rounded away. The noise is drawn for whole rows
from a seed every rank shares, so sharded and unsharded merges still write the same bytes.

The update is written for a *flat slice* of ``M_q`` (``bits`` holds elements
``[offset, offset + bits.numel())`` of the row-major ``M_q``), so the same function performs the
unsharded merge (offset 0, whole tensor) and the ZeRO-3 merge of one rank's partition, and both
produce the same bytes by construction.
"""

from __future__ import annotations

import torch

from falqon_dist.fp8 import E4M3, E4M3_MAX, to_bits


def select_rows(proxy: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` rows of ``proxy`` with the largest ``Σ_k |B_jk|``, sorted ascending.

    Deterministic for identical inputs (the same on every rank); ties keep the lower index.
    """
    magnitude = proxy.detach().float().abs().sum(dim=1)
    k = min(k, magnitude.numel())
    # A stable descending sort makes tie-breaking explicit and identical everywhere.
    order = torch.sort(magnitude, descending=True, stable=True).indices[:k]
    return order.sort().values


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


def apply_rows_(
    bits: torch.Tensor,
    offset: int,
    in_features: int,
    rows: torch.Tensor,
    proxy_rows: torch.Tensor,
    adapter_q: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> int:
    """Merge ``proxy_rows`` (k × r) into rows ``rows`` of the flat slice ``bits``; return #saturated.

    ``adapter_q`` is ``M_q[out:]`` as float32 (r × in), in the scaled domain. Only elements of the
    selected rows that fall inside ``[offset, offset + bits.numel())`` are read and written.
    ``noise`` (k × in, uniform [0, 1)) switches rounding from nearest to stochastic.
    """
    if rows.numel() == 0 or bits.numel() == 0:
        return 0
    flat = bits.view(-1)
    delta = proxy_rows.float() @ adapter_q.float()  # (k, in), scaled domain
    index = rows.to(flat.device).unsqueeze(1) * in_features + torch.arange(in_features, device=flat.device)
    index = index - offset
    local = (index >= 0) & (index < flat.numel())
    if not bool(local.any()):
        return 0
    index, delta = index[local], delta.to(flat.device)[local]
    updated = flat[index].view(E4M3).float() + delta
    saturated = int((updated.abs() > E4M3_MAX).sum())
    updated.clamp_(-E4M3_MAX, E4M3_MAX)
    if noise is None:
        flat[index] = to_bits(updated.to(E4M3))
    else:
        flat[index] = to_bits(stochastic_round_e4m3(updated, noise.to(flat.device)[local]))
    return saturated
