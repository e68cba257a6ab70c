"""Initialization of the melded matrix M = [W; A] (docs/method.md, The melded layer).

``init="svd"``: with ``s0 = amax(W)/448`` the backbone's FP8 quantization error is
``ΔQ = W − s0·Q(W/s0)``; its rank-r truncated SVD ``ΔQ ≈ U_r Σ_r V_rᵀ`` gives
``A = Σ_r^{1/2} V_rᵀ`` (r × in). ``init="random"``: ``A ~ N(mean W, std W)`` clipped to
``[min W, max W]``. Then ``s = headroom·amax(M)/448`` and ``M_q = Q(M/s)``, stored as raw E4M3 bits.

Everything is computed in float32 with an explicitly seeded generator, so every rank that converts
the same weights produces identical bytes.
"""

from __future__ import annotations

import torch

from falqon_dist.fp8 import E4M3, dequantize, quantize, tensorwise_scale, to_bits

#: Matrices with a smaller side up to this size get an exact SVD; larger ones a randomized one.
EXACT_SVD_MAX_DIM = 1024


def quantization_error(weight_hp: torch.Tensor) -> torch.Tensor:
    """``ΔQ = W − s0·Q(W/s0)`` with ``s0 = amax(W)/448``, in float32."""
    w = weight_hp.float()
    s0 = tensorwise_scale(w, E4M3)
    return w - dequantize(quantize(w, s0, E4M3), s0)


def truncated_svd(
    matrix: torch.Tensor,
    rank: int,
    generator: torch.Generator,
    oversample: int = 16,
    power_iters: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular values and right singular vectors ``(Σ_r, V_rᵀ)`` of ``matrix``.

    Exact (``torch.linalg.svd``) for small matrices; for large ones a randomized range finder
    (Halko et al. 2011) with ``power_iters`` subspace iterations, seeded by ``generator``.
    """
    rows, cols = matrix.shape
    if min(rows, cols) <= EXACT_SVD_MAX_DIM:
        _, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
        return sigma[:rank], vh[:rank]
    width = min(rank + oversample, rows, cols)
    probe = torch.randn(cols, width, generator=generator, dtype=matrix.dtype, device="cpu").to(
        matrix.device
    )
    basis, _ = torch.linalg.qr(matrix @ probe)
    for _ in range(power_iters):
        basis, _ = torch.linalg.qr(matrix.T @ basis)
        basis, _ = torch.linalg.qr(matrix @ basis)
    _, sigma, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return sigma[:rank], vh[:rank]


def adapter_init(
    weight_hp: torch.Tensor, rank: int, method: str, generator: torch.Generator
) -> torch.Tensor:
    """The LoRA A matrix (rank × in, float32) that is melded under W."""
    w = weight_hp.float()
    if method == "svd":
        sigma, vh = truncated_svd(quantization_error(w), rank, generator)
        return sigma.sqrt().unsqueeze(1) * vh
    if method == "random":
        noise = torch.randn(
            rank, w.shape[1], generator=generator, dtype=torch.float32, device="cpu"
        )
        adapter = noise.to(w.device) * w.std() + w.mean()
        return adapter.clamp_(w.min(), w.max())
    raise ValueError(f"init must be 'svd' or 'random', got {method!r}")


def meld(
    weight_hp: torch.Tensor, adapter_hp: torch.Tensor, *, headroom: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``M = [W; A]`` with one tensor-wise scale ``s = headroom · amax(M)/448``; returns
    ``(uint8 bits, scale (1,))``.

    ``s`` stays fixed for the run, so a merged weight that grows past ``448·s`` is clamped.
    ``headroom`` (a power of two) leaves room to grow that many times ``amax(M)``: dividing by a
    power of two shifts every E4M3 value by whole binades, so the bits of all values that stay above
    E4M3's smallest normal (2⁻⁶·s) round exactly as with ``headroom=1``.
    """
    if headroom < 1 or headroom & (headroom - 1):
        raise ValueError(f"headroom must be a power of two >= 1, got {headroom}")
    melded = torch.cat([weight_hp.float(), adapter_hp.float()], dim=0)
    scale = tensorwise_scale(melded, E4M3) * headroom
    bits = to_bits(quantize(melded, scale, E4M3))
    return bits, scale
