"""The ``te`` FP8 GEMM backend: NVIDIA Transformer Engine (CUDA only, optional).

Two things come from Transformer Engine's public PyTorch API:

* **casts** — ``Float8CurrentScalingQuantizer``: amax and cast fused in TE's kernels, with the same
  convention as :mod:`falqon_dist.fp8.formats` (``s = amax/F``; TE calls ``s`` the ``scale_inv``).
  With ``transpose=True`` the same kernel also writes the row-major transpose (TE's "column-wise"
  data), which is what the FP8 tensor cores need for the backward GEMMs: Hopper runs FP8 GEMMs in
  the TN layout only, i.e. both operands K-major.
* **GEMMs** — ``general_gemm`` on ``Float8Tensor`` operands built around our ``uint8`` bits, layout
  ``TN``, float32 (split) accumulation, or TE's fast accumulation when the caller asks for it
  (``fast_accum=True``: FALQON's forward GEMM). In TE's column-major convention ``general_gemm(A, B)`` in
  ``TN`` returns ``B · Aᵀ``; for our ``a @ b`` that is ``A = bᵀ`` (N × K, row-major) and ``B = a``
  (M × K, row-major). Operands not already in that layout are copied (see the FALQON layer's
  ``cache_weight_transpose`` for the one operand that is worth keeping transposed); dimensions are
  zero-padded to multiples of 16 like the ``scaled_mm`` backend.

Supported Transformer Engine versions: 2.2 and later (``Float8CurrentScalingQuantizer`` appeared in
2.2). Version differences handled here: ``general_gemm`` took a cuBLAS workspace argument up to 2.9
and allocates its own from 2.10 on (detected from its signature); TE's "internal" tensor storage
class was renamed in 2.9 (we only use the public ``Float8Tensor`` and ``get_data_tensors()``).
On Blackwell TE may not materialize a transposed copy (non-TN FP8 GEMMs are supported there); the
transpose is then a strided view and the GEMM copies it if it must.

Importing this module never imports Transformer Engine; :class:`TEBackend` does, on construction,
and raises :class:`TransformerEngineUnavailable` (an ``ImportError``) with what to do instead.
"""

from __future__ import annotations

import inspect
import re
from types import SimpleNamespace

import torch

from falqon_dist.fp8.formats import E4M3, E5M2
from falqon_dist.fp8.layout import pad_to, round_up

MIN_VERSION = (2, 2)

#: cuBLAS workspace TE sizes for Hopper and later (32 MiB + 1 KiB of alignment), else 4 MiB.
_WORKSPACE_BYTES_SM90 = 32 * 1024 * 1024 + 1024
_WORKSPACE_BYTES = 4 * 1024 * 1024


class TransformerEngineUnavailable(ImportError):
    """Transformer Engine cannot be used here (not installed, too old, or no CUDA)."""


def _unavailable(reason: str) -> TransformerEngineUnavailable:
    return TransformerEngineUnavailable(
        f"fp8.backend='te' needs NVIDIA Transformer Engine >= {'.'.join(map(str, MIN_VERSION))} on a CUDA "
        f"GPU (pip install -e '.[te]' on a CUDA machine): {reason}. "
        "Use fp8.backend=scaled_mm (cuBLASLt FP8 through torch) or fp8.backend=emulated instead."
    )


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"2.10.0.dev0+cu13"`` → ``(2, 10)``: major and minor, each from its leading digits."""
    parts = []
    for piece in version.split(".")[:2]:
        digits = re.sub(r"\D.*", "", piece, flags=re.DOTALL)
        parts.append(int(digits or 0))
    return tuple(parts)


def load_transformer_engine() -> SimpleNamespace:
    """Import the pieces of Transformer Engine this backend uses, or raise a clear error."""
    if not torch.cuda.is_available():
        raise _unavailable("CUDA is not available on this machine")
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):  # TE imports on older GPUs, but cuBLASLt has no FP8 GEMM there
        raise _unavailable(
            f"this GPU has compute capability {capability[0]}.{capability[1]}; FP8 GEMMs need 8.9 or later"
        )
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401  (loads TE's CUDA extension)
        import transformer_engine_torch as tex
        from transformer_engine.pytorch.cpp_extensions import general_gemm
        from transformer_engine.pytorch.tensor.float8_tensor import (
            Float8CurrentScalingQuantizer,
            Float8Tensor,
        )
    except Exception as exc:  # ImportError, or OSError / RuntimeError from a broken CUDA extension
        raise _unavailable(f"it did not import ({type(exc).__name__}: {exc})") from exc
    version = str(getattr(transformer_engine, "__version__", "0"))
    if _version_tuple(version) < MIN_VERSION:
        raise _unavailable(f"found version {version}")
    return SimpleNamespace(
        version=version,
        general_gemm=general_gemm,
        gemm_takes_workspace="workspace" in inspect.signature(general_gemm).parameters,
        quantizer_cls=Float8CurrentScalingQuantizer,
        tensor_cls=Float8Tensor,
        dtypes={E4M3: tex.DType.kFloat8E4M3, E5M2: tex.DType.kFloat8E5M2},
    )


class TEBackend:
    """FP8 casts and GEMMs on Transformer Engine (see module docstring)."""

    name = "te"

    def __init__(self) -> None:
        self._te = load_transformer_engine()
        self._workspaces: dict[torch.device, torch.Tensor] = {}

    @property
    def version(self) -> str:
        return self._te.version

    def _te_dtype(self, fp8_dtype: torch.dtype):
        try:
            return self._te.dtypes[fp8_dtype]
        except KeyError:
            raise ValueError(
                f"te backend: unsupported FP8 format {fp8_dtype}; valid: {list(self._te.dtypes)}"
            ) from None

    def _workspace(self, device: torch.device) -> dict[str, torch.Tensor]:
        """``{"workspace": ...}`` for TE < 2.10, whose ``general_gemm`` needs one; else nothing."""
        if not self._te.gemm_takes_workspace:
            return {}
        if device not in self._workspaces:
            hopper_or_later = torch.cuda.get_device_capability(device)[0] >= 9
            size = _WORKSPACE_BYTES_SM90 if hopper_or_later else _WORKSPACE_BYTES
            self._workspaces[device] = torch.empty(size, dtype=torch.uint8, device=device)
        return {"workspace": self._workspaces[device]}

    def quantize(
        self, x_hp: torch.Tensor, fp8_dtype: torch.dtype, *, transpose: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """TE's fused amax + cast; with ``transpose`` the row-major ``Q(x)ᵀ`` from the same kernel."""
        if x_hp.dim() != 2:
            raise ValueError(f"te backend quantizes 2-D tensors, got shape {tuple(x_hp.shape)}")
        # A fresh quantizer per call: TE < 2.18 keeps amax/scale buffers on the quantizer object.
        quantizer = self._te.quantizer_cls(
            self._te_dtype(fp8_dtype), x_hp.device, rowwise=True, columnwise=transpose
        )
        # plain storage object, no autograd wrapper: we only read the bits
        quantizer.internal = True
        with torch.cuda.device(x_hp.device):  # TE allocates its outputs on the current device
            quantized = quantizer(x_hp.contiguous())
        data, data_t = quantized.get_data_tensors()
        x_fp8 = data.view(fp8_dtype)
        # TE keeps the dequantization multiplier s in ``_scale_inv``; there is no public getter before 2.9.
        scale = quantized._scale_inv.float().reshape(1)
        if not transpose:
            return x_fp8, scale, None
        x_fp8_t = data_t.view(fp8_dtype) if data_t is not None else x_fp8.t()
        return x_fp8, scale, x_fp8_t

    def _operand(self, bits_fp8: torch.Tensor, scale: torch.Tensor):
        """A row-major FP8 matrix as TE's ``Float8Tensor`` (no copy of the bits)."""
        return self._te.tensor_cls(
            shape=bits_fp8.shape,
            dtype=torch.bfloat16,  # nominal high-precision dtype; the GEMM output dtype is separate
            data=bits_fp8.view(torch.uint8),
            fp8_scale_inv=scale.float().reshape(1),
            fp8_dtype=self._te_dtype(bits_fp8.dtype),
            requires_grad=False,
        )

    def gemm(self, a_fp8, b_fp8, scale_a, scale_b, out_dtype, fast_accum=False):
        (m, k), n = a_fp8.shape, b_fp8.shape[1]
        mp, kp, np_ = round_up(m), round_up(k), round_up(n)
        a_rows = pad_to(a_fp8, mp, kp).contiguous()  # (M, K) row-major: TE's B
        # (N, K) row-major: TE's A, used transposed
        b_cols = pad_to(b_fp8.t(), np_, kp).contiguous()
        # TE allocates operands and output on the current device
        with torch.cuda.device(a_fp8.device):
            out = self._te.general_gemm(
                self._operand(b_cols, scale_b),
                self._operand(a_rows, scale_a),
                out_dtype=out_dtype,
                layout="TN",
                use_split_accumulator=not fast_accum,  # split = promote partial sums to float32
                **self._workspace(a_fp8.device),
            )[0]
        return out[:m, :n]
