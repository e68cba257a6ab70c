"""How the FP8 methods' GEMMs and casts run (the Hydra ``fp8/`` group), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from falqon_dist.config_checks import check_choice
from falqon_dist.fp8.backends import BACKEND_NAMES
from falqon_dist.fp8.cast import CAST_KERNELS


@dataclass(frozen=True)
class Fp8Config:
    """``conf/fp8/default.yaml`` documents every field; the same for FALQON and FP8 LoRA."""

    #: FP8 GEMM backend: "auto" | "emulated" | "scaled_mm" | "te" (see falqon_dist.fp8.backends).
    backend: str = "auto"
    #: How dynamic FP8 casts run: "compiled" (fused by torch.compile) or "eager" (op by op, same bits).
    cast: str = "compiled"

    def __post_init__(self) -> None:
        check_choice("Fp8Config", "backend", self.backend, BACKEND_NAMES)
        check_choice("Fp8Config", "cast", self.cast, CAST_KERNELS)
