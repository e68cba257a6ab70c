"""The row-wise proxy update that merges B into the FP8 backbone (DESIGN.md §1).

With row magnitudes ``m_j = Σ_k |B_jk|`` and ``T`` the top-k rows of ``m``, in the scaled FP8 domain

    M_q[T] ← Q(clamp(M_q[T] + B[T] · M_q[out:], ±448))

W and A share the scale ``s``, so ``s·(W_q,j + B_j A_q) = W_j + B_j A`` needs no rescale. Here ``B``
is the proxy in *real* units per unit of ``o_A`` — because ``o_A = x Aᵀ`` already carries ``s``, the
update to ``W_q`` is ``B_j · A_q`` exactly. Elements whose sum leaves ``±448`` are clamped and counted
as ``saturated``.

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


def apply_rows_(
    bits: torch.Tensor,
    offset: int,
    in_features: int,
    rows: torch.Tensor,
    proxy_rows: torch.Tensor,
    adapter_q: torch.Tensor,
) -> int:
    """Merge ``proxy_rows`` (k × r) into rows ``rows`` of the flat slice ``bits``; return #saturated.

    ``adapter_q`` is ``M_q[out:]`` as float32 (r × in), in the scaled domain. Only elements of the
    selected rows that fall inside ``[offset, offset + bits.numel())`` are read and written.
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
    flat[index] = to_bits(updated.clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3))
    return saturated
