"""FP8 formats: tensor-wise scales, quantize / dequantize, and raw-bit storage.

Conventions (used everywhere in falqon_dist):

* A *scale* ``s`` is the dequantization multiplier: ``real ≈ fp8 × s``. For a tensor ``x``
  quantized to a format with largest finite value ``F``, the tensor-wise scale is
  ``s = amax(|x|) / F`` so that ``x / s`` spans the whole format.
* Quantization is ``Q(x / s)``: clamp to ``[-F, F]`` (E4M3 has no infinity; an out-of-range cast
  would produce NaN) then ``.to(fp8_dtype)``, which rounds to nearest, ties to even.
* FP8 bits are *stored* as ``uint8`` tensors and reinterpreted with ``.view(fp8_dtype)`` only at
  compute time: collectives (gloo), DeepSpeed partitioning and checkpoints handle ``uint8`` everywhere,
  float8 dtypes not always.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2

#: Largest finite magnitude of each FP8 format.
FP8_MAX: dict[torch.dtype, float] = {E4M3: 448.0, E5M2: 57344.0}

E4M3_MAX = FP8_MAX[E4M3]
E5M2_MAX = FP8_MAX[E5M2]


def _check_format(fp8_dtype: torch.dtype) -> float:
    try:
        return FP8_MAX[fp8_dtype]
    except KeyError:
        raise ValueError(f"unsupported FP8 format {fp8_dtype}; valid: {list(FP8_MAX)}") from None


def tensorwise_scale(x_hp: torch.Tensor, fp8_dtype: torch.dtype = E4M3) -> torch.Tensor:
    """Return ``s = amax(|x|) / F`` as a float32 tensor of shape (1,).

    An all-zero tensor gets ``s = 1`` (any scale represents zeros exactly; 1 avoids 0/0).
    """
    fmax = _check_format(fp8_dtype)
    amax = x_hp.detach().abs().amax().float().reshape(1)
    return torch.where(amax > 0, amax / fmax, torch.ones_like(amax))


def quantize(
    x_hp: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype = E4M3
) -> torch.Tensor:
    """``Q(x / s)``: divide in float32, clamp to the format's range, round to nearest even."""
    fmax = _check_format(fp8_dtype)
    return (x_hp.float() / scale.float()).clamp_(-fmax, fmax).to(fp8_dtype)


def quantize_dynamic(
    x_hp: torch.Tensor, fp8_dtype: torch.dtype = E4M3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize with a fresh tensor-wise scale; returns ``(x_fp8, scale)``."""
    scale = tensorwise_scale(x_hp, fp8_dtype)
    return quantize(x_hp, scale, fp8_dtype), scale


def dequantize(
    x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``fp8 × s`` in ``dtype`` (the product is formed in float32)."""
    return (x_fp8.float() * scale.float()).to(dtype)


def to_bits(x_fp8: torch.Tensor) -> torch.Tensor:
    """Reinterpret an FP8 tensor as its raw ``uint8`` bits (no copy)."""
    return x_fp8.view(torch.uint8)


def from_bits(bits: torch.Tensor, fp8_dtype: torch.dtype = E4M3) -> torch.Tensor:
    """Reinterpret raw ``uint8`` bits as an FP8 tensor (no copy)."""
    if bits.dtype != torch.uint8:
        raise TypeError(f"FP8 bits must be stored as uint8, got {bits.dtype}")
    _check_format(fp8_dtype)
    return bits.view(fp8_dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``20·log10(‖ref‖ / ‖ref − approx‖)``."""
    ref = reference.double()
    noise = (ref - approx.double()).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(ref.norm() / noise))
