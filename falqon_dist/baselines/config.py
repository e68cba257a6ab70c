"""One frozen, self-validating config per baseline method (FALQON's is :class:`~falqon_dist.method.FalqonConfig`).

Each field is checked on construction; a bad value raises
:class:`~falqon_dist.config_checks.InvalidField` (a ``ValueError``) naming the field and what would
be valid. The Hydra ``method/`` group's files hold exactly these fields (plus ``name``, ``lr`` and
the layer choice, which are the run's), so a config file and its class cannot drift apart (a test
composes every file against its class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from falqon_dist.config_checks import InvalidField, check_bool, check_choice, check_positive_int
from falqon_dist.fp8.backends import BACKEND_NAMES


def _check_alpha(owner: str, alpha: Any) -> None:
    if alpha is None:
        return
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise InvalidField(owner, "alpha", "must be None (= rank) or a finite number > 0", alpha)


def _check_dropout(owner: str, dropout: Any) -> None:
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float))
        or not 0.0 <= dropout < 1.0
    ):
        raise InvalidField(owner, "dropout", "must be a number in [0, 1)", dropout)


@dataclass(frozen=True)
class LoraConfig:
    """bf16 LoRA through peft: ``y = xWᵀ + (α/r)·dropout(x)·Aᵀ·Bᵀ``."""

    #: LoRA rank r.
    rank: int = 16
    #: Scaling numerator; None = rank (scaling 1, the footing of FALQON, whose B is in real units).
    alpha: float | None = None
    #: Dropout on the LoRA input.
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int("LoraConfig", "rank", self.rank)
        _check_alpha("LoraConfig", self.alpha)
        _check_dropout("LoraConfig", self.dropout)


@dataclass(frozen=True)
class Fp8LoraConfig:
    """FP8 backbone GEMM plus a separately quantized FP8 LoRA path (the torchao-style baseline)."""

    #: LoRA rank r.
    rank: int = 16
    #: Scaling numerator; None = rank.
    alpha: float | None = None
    #: FP8 GEMM backend: "auto" | "emulated" | "scaled_mm" | "te" (see falqon_dist.fp8.backends).
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_positive_int("Fp8LoraConfig", "rank", self.rank)
        _check_alpha("Fp8LoraConfig", self.alpha)
        check_choice("Fp8LoraConfig", "backend", self.backend, BACKEND_NAMES)


@dataclass(frozen=True)
class QloraConfig:
    """NF4 backbone through bitsandbytes + peft LoRA, computed in the model's dtype."""

    #: LoRA rank r.
    rank: int = 16
    #: Scaling numerator; None = rank.
    alpha: float | None = None
    #: Dropout on the LoRA input.
    dropout: float = 0.0
    #: Store the per-64-block NF4 scales as 8-bit codes (the QLoRA paper's double quantization).
    double_quant: bool = True

    def __post_init__(self) -> None:
        check_positive_int("QloraConfig", "rank", self.rank)
        _check_alpha("QloraConfig", self.alpha)
        _check_dropout("QloraConfig", self.dropout)
        check_bool("QloraConfig", "double_quant", self.double_quant)


@dataclass(frozen=True)
class FullConfig:
    """Full fine-tuning: every parameter trainable; nothing to configure."""
