"""FP8 numerics: formats, scales, quantize/dequantize, raw-bit storage, operand layouts and GEMM backends."""

from falqon_dist.fp8.backends import (
    BACKEND_NAMES,
    EmulatedBackend,
    GemmBackend,
    ScaledMMBackend,
    check_backend,
    resolve_backend,
)
from falqon_dist.fp8.formats import (
    E4M3,
    E4M3_MAX,
    E5M2,
    E5M2_MAX,
    FP8_MAX,
    dequantize,
    from_bits,
    quantize,
    quantize_dynamic,
    sqnr_db,
    tensorwise_scale,
    to_bits,
)
from falqon_dist.fp8.layout import TransposedBitsCache

__all__ = [
    "BACKEND_NAMES",
    "E4M3",
    "E4M3_MAX",
    "E5M2",
    "E5M2_MAX",
    "FP8_MAX",
    "EmulatedBackend",
    "GemmBackend",
    "ScaledMMBackend",
    "TransposedBitsCache",
    "check_backend",
    "dequantize",
    "from_bits",
    "quantize",
    "quantize_dynamic",
    "resolve_backend",
    "sqnr_db",
    "tensorwise_scale",
    "to_bits",
]
