"""The training loop's configuration (the Hydra ``train`` section), validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from falqon_dist.config_checks import (
    InvalidField,
    check_bool,
    check_choice,
    check_non_negative_int,
    check_number,
    check_positive_int,
)

SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class TrainConfig:
    """Steps, batch sizes, the learning-rate schedule, checkpoints, evaluation and the divergence
    guards (``conf/config.yaml`` documents every field). A default here is what a saved config that
    lacks the key (written before the key existed) ran with; the shipped defaults are in the YAML."""

    max_steps: int
    micro_batch_size: int
    grad_accum: int
    lr: float
    schedule: str
    min_lr_ratio: float
    weight_decay: float
    save_every: int
    keep_checkpoints: int
    eval_every: int
    eval_samples: int
    eval_generate_samples: int
    resume: bool
    log_every: int
    #: Linear warm-up steps; None = round(warmup_ratio × max_steps). Always an int after construction.
    warmup_steps: int | None = None
    #: Passes over the training data instead of max_steps (None: max_steps counts); the trainer
    #: turns it into max_steps once the data is built (:meth:`for_steps_per_epoch`).
    epochs: float | None = None
    warmup_ratio: float = 0.0
    #: Consecutive steps with a non-finite loss, gradient norm or merge before the run stops.
    max_nonfinite_steps: int = 3
    #: Fraction of merged FP8 elements clamped at ±448 in a step above which a warning is logged,
    #: and (when set) above which the run stops.
    saturation_warn: float = 0.01
    saturation_abort: float | None = None

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        for field in (
            "max_steps",
            "micro_batch_size",
            "grad_accum",
            "keep_checkpoints",
            "log_every",
            "max_nonfinite_steps",
        ):
            check_positive_int(owner, field, getattr(self, field))
        for field in ("save_every", "eval_every", "eval_samples", "eval_generate_samples"):
            check_non_negative_int(owner, field, getattr(self, field))
        check_number(owner, "lr", self.lr, 0.0, low_open=True)
        check_choice(owner, "schedule", self.schedule, SCHEDULES)
        check_number(owner, "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_number(owner, "weight_decay", self.weight_decay, 0.0)
        check_bool(owner, "resume", self.resume)
        check_number(owner, "warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        check_number(owner, "saturation_warn", self.saturation_warn, 0.0, 1.0)
        if self.saturation_abort is not None:
            check_number(owner, "saturation_abort", self.saturation_abort, 0.0, 1.0)
        if self.epochs is not None:
            check_number(owner, "epochs", self.epochs, 0.0, low_open=True)
        object.__setattr__(self, "_warmup_from_ratio", self.warmup_steps is None)
        if self.warmup_steps is None:
            object.__setattr__(self, "warmup_steps", round(self.warmup_ratio * self.max_steps))
        else:
            check_non_negative_int(owner, "warmup_steps", self.warmup_steps)
        for field in ("lr", "min_lr_ratio", "weight_decay", "warmup_ratio", "saturation_warn"):
            object.__setattr__(self, field, float(getattr(self, field)))

    def for_steps_per_epoch(self, micro_batches_per_epoch: int) -> TrainConfig:
        """With ``epochs`` set: this config with ``max_steps = ceil(epochs × micro-batches per epoch /
        grad_accum)`` (a rank's micro-batches; at least 1) and a ratio warm-up recomputed from it.
        Without: unchanged."""
        if self.epochs is None:
            return self
        steps = max(1, math.ceil(self.epochs * micro_batches_per_epoch / self.grad_accum))
        warmup = None if getattr(self, "_warmup_from_ratio", False) else self.warmup_steps
        return dataclasses.replace(self, max_steps=steps, warmup_steps=warmup)


__all__ = ["SCHEDULES", "InvalidField", "TrainConfig"]
