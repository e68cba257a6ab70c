"""FP8 GEMM backends behind one narrow interface: a dynamic cast and a scaled product.

Every backend provides

    quantize(x, fmt, transpose=False) -> (x_fp8, s, x_fp8ᵀ or None)
        x_fp8 = Q(x / s) with a fresh tensor-wise s = amax(|x|) / F, through the fused cast of
        :mod:`falqon_dist.fp8.cast` (torch backends) or TE's own kernel; with ``transpose`` also
        Q(x)ᵀ — a strided view where the GEMM does not care (``emulated``), else a row-major copy
        written by the same fused kernel, which the backward GEMMs then use without another pass.

    gemm(a_fp8, b_fp8, scale_a, scale_b, out_dtype, fast_accum=False) -> (a_fp8 @ b_fp8) · scale_a · scale_b
        a: (M, K), b: (K, N), out: (M, N); FP8 operands of any strides (each backend makes the layout
        its kernel needs, see :mod:`falqon_dist.fp8.layout`), float32 tensor-wise scales of shape
        (1,), products formed exactly and accumulated in float32, the result rounded to
        ``out_dtype`` (the emulated backend's bf16 result is rounded by the bf16 matmul and again
        after scaling: at most one extra bf16 unit in the last place). ``fast_accum`` lets Hopper's
        FP8 tensor cores keep partial sums in their ~13-mantissa-bit accumulator for longer before
        promoting them to float32 (cuBLASLt's fast-accumulation mode; TE's split accumulator off):
        10–20% faster, slightly less precise. Used for forward GEMMs only, as torchao does; the
        backward GEMMs always promote. Backends without such a mode ignore it.

* ``emulated`` — dequantize to a wider float and matmul. FP8 → bf16 is exact (E4M3/E5M2 mantissas
  and exponents fit in bf16), so the products are exact; accumulation is float32. For a float32
  result the operands are widened to float32 instead, so nothing is rounded before the final scale.
  Runs anywhere and is the fastest choice on CPU.
* ``scaled_mm`` — ``torch._scaled_mm`` (cuBLASLt FP8 on CUDA with compute capability ≥ 8.9; a slow
  reference kernel on CPU). Needs a row-major ``a``, a column-major ``b`` and dimensions that are
  multiples of 16: this backend copies and zero-pads as needed (zeros leave the product unchanged).
* ``te`` — Transformer Engine (CUDA only, optional; :mod:`falqon_dist.fp8.te_backend`): fused
  amax + cast kernels that also write the transposed copy, and TE's ``general_gemm``.

``resolve_backend("auto", device)`` picks ``scaled_mm`` on CUDA with compute capability ≥ 8.9, else
``emulated``. ``te`` is never picked automatically: choose it explicitly. (It has been checked
against ``emulated`` only by the GPU test tier, which needs a CUDA machine with TE installed; until
that tier has run on one, ``scaled_mm`` — the same cuBLASLt kernels — is the measured GPU path.)
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch

from falqon_dist.fp8.cast import dynamic_cast, scale_epilogue
from falqon_dist.fp8.layout import pad_to, round_up

BACKEND_NAMES = ("auto", "emulated", "scaled_mm", "te")


class GemmBackend(Protocol):
    """What the FP8 layers need from a backend: a dynamic cast and one scaled product."""

    name: str

    def quantize(
        self, x_hp: torch.Tensor, fp8_dtype: torch.dtype, *, transpose: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(Q(x/s), s, Q(x/s)ᵀ if transpose else None)`` with a fresh tensor-wise scale ``s``."""
        ...

    def gemm(
        self,
        a_fp8: torch.Tensor,
        b_fp8: torch.Tensor,
        scale_a: torch.Tensor,
        scale_b: torch.Tensor,
        out_dtype: torch.dtype,
        fast_accum: bool = False,
    ) -> torch.Tensor:
        """Return ``(a_fp8 @ b_fp8) · scale_a · scale_b`` in ``out_dtype``."""
        ...


class _TorchCast:
    """The cast of the torch backends: :func:`falqon_dist.fp8.cast.dynamic_cast` (fused when compiled).

    ``transpose_copy`` says whether this backend's GEMM needs ``Q(x)ᵀ`` row-major (then the cast
    kernel writes it) or takes any strides (then it is a free view).
    """

    transpose_copy = False

    def quantize(self, x_hp, fp8_dtype, *, transpose=False):
        if transpose and self.transpose_copy:
            return dynamic_cast(x_hp, fp8_dtype, transpose_copy=True)
        x_fp8, scale, _ = dynamic_cast(x_hp, fp8_dtype)
        return x_fp8, scale, (x_fp8.t() if transpose else None)


class EmulatedBackend(_TorchCast):
    """Dequantize-then-matmul; exact products, float32 accumulation (see module docstring)."""

    name = "emulated"

    def gemm(self, a_fp8, b_fp8, scale_a, scale_b, out_dtype, fast_accum=False):
        wide = torch.float32 if out_dtype == torch.float32 else torch.bfloat16
        out = torch.matmul(a_fp8.to(wide), b_fp8.to(wide))
        return scale_epilogue(out, scale_a * scale_b, out_dtype)


class ScaledMMBackend(_TorchCast):
    """``torch._scaled_mm`` with the layout and alignment it requires."""

    name = "scaled_mm"
    transpose_copy = True  # cuBLASLt wants K-major operands: g_qᵀ and Q(o_A)ᵀ are written row-major

    def gemm(self, a_fp8, b_fp8, scale_a, scale_b, out_dtype, fast_accum=False):
        (m, k), n = a_fp8.shape, b_fp8.shape[1]
        mp, kp, np_ = round_up(m), round_up(k), round_up(n)
        a = pad_to(a_fp8, mp, kp).contiguous()  # row-major (M, K)
        # column-major (K, N): the transpose of a row-major (N, K)
        b = pad_to(b_fp8.t(), np_, kp).contiguous().t()
        out = torch._scaled_mm(
            a,
            b,
            scale_a.float().reshape(()),
            scale_b.float().reshape(()),
            out_dtype=out_dtype,
            use_fast_accum=fast_accum,
        )
        return out[:m, :n]


def _fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@functools.cache
def _instance(name: str) -> GemmBackend:
    if name == "emulated":
        return EmulatedBackend()
    if name == "scaled_mm":
        return ScaledMMBackend()
    if name == "te":
        from falqon_dist.fp8.te_backend import TEBackend  # imports Transformer Engine

        return TEBackend()
    raise ValueError(f"unknown FP8 GEMM backend {name!r}; valid: {BACKEND_NAMES}")


def resolve_backend(name: str, device: torch.device | str = "cpu") -> GemmBackend:
    """Map a configured backend name (possibly ``auto``) to a backend for tensors on ``device``.

    Raises ``ValueError`` for an unknown name or ``te`` with tensors off CUDA, and
    :class:`~falqon_dist.fp8.te_backend.TransformerEngineUnavailable` (an ``ImportError``) when
    ``te`` is asked for and Transformer Engine cannot be used.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown FP8 GEMM backend {name!r}; valid: {BACKEND_NAMES}")
    device = torch.device(device)
    if name == "auto":
        name = "scaled_mm" if _fp8_tensor_cores(device) else "emulated"
    if name == "te" and device.type != "cuda":
        raise ValueError(f"fp8.backend='te' runs on CUDA tensors only, got tensors on {device}")
    return _instance(name)


def check_backend(name: str) -> None:
    """Fail fast, before any work, if backend ``name`` cannot run on this machine.

    ``emulated`` and ``auto`` always can; ``scaled_mm`` can anywhere (on CPU it is a slow reference);
    ``te`` needs CUDA and an importable Transformer Engine (the error says what to use instead).
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown FP8 GEMM backend {name!r}; valid: {BACKEND_NAMES}")
    if name == "te":
        _instance("te")
