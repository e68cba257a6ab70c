"""FP8 GEMM backends behind one narrow interface.

Every backend computes the scaled FP8 product

    out = (a_fp8 @ b_fp8) · scale_a · scale_b        a: (M, K), b: (K, N), out: (M, N)

with FP8 operands of any strides (each backend makes the layout its kernel needs), float32
tensor-wise scales of shape (1,), products formed exactly and accumulated in float32, and the
result rounded to ``out_dtype`` (the emulated backend's bf16 result is rounded by the bf16 matmul and
again after scaling: at most one extra bf16 unit in the last place).

* ``emulated`` — dequantize to a wider float and matmul. FP8 → bf16 is exact (E4M3/E5M2 mantissas
  and exponents fit in bf16), so the products are exact; accumulation is float32. For a float32
  result the operands are widened to float32 instead, so nothing is rounded before the final scale.
  Runs anywhere and is the fastest choice on CPU.
* ``scaled_mm`` — ``torch._scaled_mm`` (cuBLASLt FP8 on CUDA with compute capability ≥ 8.9; a slow
  reference kernel on CPU). Needs a row-major ``a``, a column-major ``b`` and dimensions that are
  multiples of 16: this backend copies and zero-pads as needed (zeros leave the product unchanged).
* ``te`` — Transformer Engine (CUDA only). The name is reserved and validated; the backend itself is
  not built yet, so asking for it fails with a message that points at ``scaled_mm``.

``resolve_backend("auto", device)`` picks ``scaled_mm`` on CUDA with compute capability ≥ 8.9, else
``emulated``. (Once the ``te`` backend exists, ``auto`` will prefer it where it imports on CUDA.)
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F

BACKEND_NAMES = ("auto", "emulated", "scaled_mm", "te")


class GemmBackend(Protocol):
    """What the FALQON layer needs from an FP8 GEMM: one scaled product."""

    name: str

    def gemm(
        self,
        a_fp8: torch.Tensor,
        b_fp8: torch.Tensor,
        scale_a: torch.Tensor,
        scale_b: torch.Tensor,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Return ``(a_fp8 @ b_fp8) · scale_a · scale_b`` in ``out_dtype``."""
        ...


class EmulatedBackend:
    """Dequantize-then-matmul; exact products, float32 accumulation (see module docstring)."""

    name = "emulated"

    def gemm(self, a_fp8, b_fp8, scale_a, scale_b, out_dtype):
        wide = torch.float32 if out_dtype == torch.float32 else torch.bfloat16
        out = torch.matmul(a_fp8.to(wide), b_fp8.to(wide))
        return (out.float() * (scale_a * scale_b)).to(out_dtype)


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor at the bottom/right (FP8 padding goes through its uint8 bits)."""
    pad_r, pad_c = rows - x.shape[0], cols - x.shape[1]
    if pad_r == 0 and pad_c == 0:
        return x
    return F.pad(x.view(torch.uint8), (0, pad_c, 0, pad_r)).view(x.dtype)


def _round_up(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


class ScaledMMBackend:
    """``torch._scaled_mm`` with the layout and alignment it requires."""

    name = "scaled_mm"

    def gemm(self, a_fp8, b_fp8, scale_a, scale_b, out_dtype):
        (m, k), n = a_fp8.shape, b_fp8.shape[1]
        mp, kp, np_ = _round_up(m), _round_up(k), _round_up(n)
        a = _pad_to(a_fp8, mp, kp).contiguous()  # row-major (M, K)
        # column-major (K, N): the transpose of a row-major (N, K)
        b = _pad_to(b_fp8.t(), np_, kp).contiguous().t()
        out = torch._scaled_mm(
            a, b, scale_a.float().reshape(()), scale_b.float().reshape(()), out_dtype=out_dtype
        )
        return out[:m, :n]


def _scaled_mm_hardware(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@functools.cache
def _instance(name: str) -> GemmBackend:
    if name == "emulated":
        return EmulatedBackend()
    if name == "scaled_mm":
        return ScaledMMBackend()
    if name == "te":
        raise NotImplementedError(
            "fp8.backend='te' (Transformer Engine) is not available in this version of falqon_dist; "
            "use 'scaled_mm' (cuBLASLt FP8 on CUDA) or 'emulated'"
        )
    raise ValueError(f"unknown FP8 GEMM backend {name!r}; valid: {BACKEND_NAMES}")


def resolve_backend(name: str, device: torch.device | str = "cpu") -> GemmBackend:
    """Map a configured backend name (possibly ``auto``) to a backend for tensors on ``device``."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown FP8 GEMM backend {name!r}; valid: {BACKEND_NAMES}")
    device = torch.device(device)
    if name == "auto":
        if _scaled_mm_hardware(device):
            name = "scaled_mm"
        else:
            name = "emulated"
    return _instance(name)
