"""Fused dynamic FP8 casts: amax → scale → cast (→ transposed copy) in as few kernels as possible.

A dynamic tensor-wise cast is ``s = amax(|x|)/F``, ``x_fp8 = Q(clamp(x/s, ±F))``. Written as eager
torch ops it is about ten kernels (abs, amax, float, where, divide, clamp, cast, …) that each read
or write the whole tensor: ~33 bytes moved per bf16 element. Compiled with ``torch.compile``
(inductor: Triton on CUDA, C++/OpenMP on CPU) it is one reduction pass and one pointwise pass:
read x twice, write one byte (plus one more for the transposed copy): 5–6 bytes per element.

Two implementations with **bit-identical results** (tested):

* ``compiled`` (default): the same math traced once per (format, transposed-copy) pair with dynamic
  shapes, so a new token count does not recompile. The CPU path of the tests runs this code.
* ``eager``: :func:`falqon_dist.fp8.formats.quantize_dynamic` op by op — the reference, and the
  fallback to select explicitly (``fp8.cast=eager``) where inductor cannot compile (no C++
  compiler on a CPU machine, no Triton on a GPU one).

The choice is process-wide (:func:`set_cast_kernels`), like torch's own backend flags: the layers
call :func:`dynamic_cast` and never know which implementation ran.

:class:`SharedCast` lets layers that read the same input tensor in one forward (q/k/v, gate/up)
share one cast: it returns the previous result when handed the very same tensor object, unmodified
since (same ``_version``), for the same format and backend.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _python_dispatch

from falqon_dist.fp8.formats import E4M3, E5M2, FP8_MAX, quantize_dynamic

CAST_KERNELS = ("compiled", "eager")

_mode = "compiled"

CastResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class CompiledVariants:
    """One ``torch.compile``d graph (dynamic shapes, ``fullgraph``) per variant of an eager function,
    compiled on first use and kept for the process: ``variants[key]`` is the compiled callable.

    Each variant must be its own module-level function (its own code object) that calls the shared
    eager reference with that variant's fixed arguments: dynamo keeps compiled graphs per code
    object and caps them (``recompile_limit``), so variants behind one code object would share, and
    exhaust, one budget. Checked here, on construction. The eager reference is what is traced, so
    compiled and eager bits agree by construction.
    """

    def __init__(self, variants: dict[Any, Callable]) -> None:
        codes = [fn.__code__ for fn in variants.values()]
        if len(set(codes)) != len(codes):
            raise ValueError("CompiledVariants: every variant needs its own function (code object)")
        self._variants = variants
        self._compiled: dict[Any, Callable] = {}

    def __getitem__(self, key: Any) -> Callable:
        if key not in self._compiled:
            self._compiled[key] = torch.compile(self._variants[key], dynamic=True, fullgraph=True)
        return self._compiled[key]


def set_cast_kernels(mode: str) -> None:
    """Select how dynamic FP8 casts run in this process: ``compiled`` (fused) or ``eager``."""
    global _mode
    if mode not in CAST_KERNELS:
        raise ValueError(f"FP8 cast kernels must be one of {CAST_KERNELS}, got {mode!r}")
    _mode = mode


def cast_kernels() -> str:
    """The cast implementation in use (``compiled`` or ``eager``)."""
    return _mode


def _cast_eager(x_hp: torch.Tensor, fp8_dtype: torch.dtype, transpose_copy: bool) -> CastResult:
    x_fp8, scale = quantize_dynamic(x_hp, fp8_dtype)
    return x_fp8, scale, (x_fp8.t().contiguous() if transpose_copy else None)


# One function per (format, transposed copy) variant (see CompiledVariants).
def _cast_e4m3(x_hp: torch.Tensor) -> CastResult:
    return _cast_eager(x_hp, E4M3, False)


def _cast_e4m3_t(x_hp: torch.Tensor) -> CastResult:
    return _cast_eager(x_hp, E4M3, True)


def _cast_e5m2(x_hp: torch.Tensor) -> CastResult:
    return _cast_eager(x_hp, E5M2, False)


def _cast_e5m2_t(x_hp: torch.Tensor) -> CastResult:
    return _cast_eager(x_hp, E5M2, True)


_COMPILED_CASTS = CompiledVariants(
    {
        (E4M3, False): _cast_e4m3,
        (E4M3, True): _cast_e4m3_t,
        (E5M2, False): _cast_e5m2,
        (E5M2, True): _cast_e5m2_t,
    }
)


def _dispatch_mode_active() -> bool:
    """Whether a Python ``TorchDispatchMode`` is on the stack (op counters, tracing tools).

    torch.compile refuses to run under one; the casts then take the eager path, which gives the
    same bits. Reads a torch internal (``torch.utils._python_dispatch``), checked by the tests.
    """
    return _python_dispatch._get_current_dispatch_mode() is not None


def dynamic_cast(
    x_hp: torch.Tensor, fp8_dtype: torch.dtype, *, transpose_copy: bool = False
) -> CastResult:
    """``(Q(x/s), s, Q(x/s)ᵀ as a row-major copy or None)`` with ``s = amax(|x|)/F`` of shape (1,).

    Runs the implementation chosen by :func:`set_cast_kernels`; both give the same bits.
    """
    if fp8_dtype not in FP8_MAX:
        raise ValueError(f"unsupported FP8 format {fp8_dtype}; valid: {list(FP8_MAX)}")
    if not compiled_kernels_apply(x_hp):
        return _cast_eager(x_hp, fp8_dtype, transpose_copy)
    # Few distinct graphs per entry point (dynamo caps them at recompile_limit): detached (graphs are
    # specialized on requires_grad), contiguous (and on strides: only small strided inputs such as
    # o_A = Y[:, out:] pay a copy) and, without the transposed copy, flat (one dynamic size).
    x = x_hp.detach()
    if not x.is_contiguous():
        x = x.contiguous()
    if not transpose_copy:
        x = x.reshape(-1)
    x_fp8, scale, x_fp8_t = run_compiled(
        _COMPILED_CASTS[fp8_dtype, transpose_copy],
        lambda: _cast_eager(x_hp, fp8_dtype, transpose_copy),
        x,
        what="FP8 cast",
    )
    return x_fp8.view(x_hp.shape), scale, x_fp8_t


def compiled_kernels_apply(*tensors: torch.Tensor) -> bool:
    """Whether the fused (``torch.compile``) kernels run on these inputs: compiled mode selected, no
    Python dispatch mode active, and no empty input. Used by the casts and by the proxy merge."""
    return _mode == "compiled" and all(t.numel() for t in tensors) and not _dispatch_mode_active()


def run_compiled(compiled: Callable, eager: Callable[[], Any], *args: Any, what: str) -> Any:
    """``compiled(*args)``; ``eager()`` (the bit-identical reference) when dynamo has met more input
    variants than it keeps (warned once); a failure to compile raises naming ``fp8.cast=eager``."""
    try:
        return compiled(*args)
    except Exception as exc:
        if "RecompileLimit" in type(exc).__name__:
            _warn_recompile_limit(exc, what)
            return eager()
        raise RuntimeError(
            f"the compiled {what} failed on {args[0].device} ({type(exc).__name__}: {exc}); "
            "torch.compile needs a C++ compiler on CPU and Triton on CUDA. "
            "Select the eager kernels instead: fp8.cast=eager (or falqon_dist.fp8.set_cast_kernels('eager'))"
        ) from exc


_warned_recompile_limit = False


def _warn_recompile_limit(exc: Exception, what: str) -> None:
    global _warned_recompile_limit
    if _warned_recompile_limit:
        return
    _warned_recompile_limit = True
    warnings.warn(
        f"falqon_dist: the compiled {what} met more input variants (dtype, layout, size 1) than torch.compile "
        f"keeps ({type(exc).__name__}); those calls run eagerly (bit-identical, slower)",
        stacklevel=3,
    )


def _scale_product(
    product: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    return (product.float() * scale).to(out_dtype)


_COMPILED_SCALE_PRODUCT = CompiledVariants({None: _scale_product})


def scale_epilogue(
    product: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``(product · scale)`` formed in float32 and rounded to ``out_dtype`` (one fused pass when compiled)."""
    if not compiled_kernels_apply(product):
        return _scale_product(product, scale, out_dtype)
    return _COMPILED_SCALE_PRODUCT[None](product.detach(), scale.detach(), out_dtype)


class SharedCast:
    """A one-entry cache of the latest cast, for layers that read the same input tensor.

    ``q_proj(h)``, ``k_proj(h)`` and ``v_proj(h)`` receive the same tensor object ``h``: casting it
    once instead of three times saves two full passes over the activations. A hit needs the same
    tensor object (held by weak reference, so a freed tensor can never alias a new one), the same
    version counter (any in-place write to ``h`` or a view of it bumps it), the same format,
    backend and transposed-copy request. Holds one cast result until the next miss.
    """

    def __init__(self) -> None:
        self._source: weakref.ref[torch.Tensor] | None = None
        self._key: tuple | None = None
        self._result: CastResult | None = None
        self.hits = 0
        self.misses = 0

    def get(self, x_hp: torch.Tensor, key: tuple, compute: Callable[[], CastResult]) -> CastResult:
        """The cast of ``x_hp`` under ``key`` (format, backend, …): cached, or ``compute()``."""
        full_key = (key, x_hp._version, x_hp.dtype, x_hp.shape, x_hp.device)
        source = self._source() if self._source is not None else None
        if source is x_hp and self._key == full_key and self._result is not None:
            self.hits += 1
            return self._result
        self.misses += 1
        result = compute()
        self._source, self._key, self._result = weakref.ref(x_hp), full_key, result
        return result

    def clear(self) -> None:
        self._source = self._key = self._result = None
