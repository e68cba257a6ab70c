"""How a merge rounds to E4M3: to nearest (the paper) or stochastically, with counter-based noise.

With stochastic rounding, ``v`` between neighbouring E4M3 values ``lo < v < hi`` becomes ``hi`` with
probability ``(v − lo)/(hi − lo)``, so ``E[Q(v)] = v`` and an update smaller than half an FP8 step
still moves the weight on average. The uniform noise is a counter-based hash of (layer seed, step,
element index in ``M_q``): no generator state, computed where the element is (a tile on the CPU, a
register in the GPU kernel), and the same bits on every rank, every device and every ZeRO-3
partitioning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from falqon_dist.fp8 import E4M3, to_bits

_MASK32 = 0xFFFFFFFF


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


def noise_keys(seed: int, step: int) -> tuple[int, int]:
    """The two 32-bit keys of (seed, step) that :func:`merge_noise` mixes into each element index
    (for the low and the high 32 bits of the index): host integers, no device work."""
    key = _hash32_int(_hash32_int(seed) ^ _hash32_int(step + 0x9E3779B9))
    return key, _hash32_int(key + 1)


def merge_noise(seed: int, step: int, element_index: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32 noise, a pure function of (seed, step, element index in ``M_q``).

    24 bits per draw (exact in float32). The same on any device, rank and partitioning.
    """
    key_lo, key_hi = noise_keys(seed, step)
    index = element_index.to(torch.int64)
    mixed = _hash32((index & _MASK32) ^ key_lo)
    mixed = _hash32(mixed ^ (index >> 32) ^ key_hi)
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

    def noise_for_rows(
        self, rows: torch.Tensor, in_features: int, device: torch.device
    ) -> torch.Tensor | None:
        """Noise for every element of ``rows`` of ``M_q`` (k × in), or None for nearest rounding,
        which never builds the k × in element indices."""
        if not self.stochastic:
            return None
        return self.noise(
            rows.to(device).unsqueeze(1) * in_features + torch.arange(in_features, device=device)
        )


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
