"""Divergence and stall watch: reads each step's record and stops a run that has gone bad.

:class:`StepWatch` reads each step's record (loss, gradient norm, FALQON's merge counts) on rank 0's
values — every rank sees the same all-reduced numbers, so every rank decides the same:

* **non-finite** — a NaN/inf loss or gradient norm, or merged FP8 elements whose update was not
  finite (the merge refused them: the backbone never holds a NaN). One such step is survivable
  (DeepSpeed skips a NaN gradient; the merge zeroes the bad rows of B); ``max_nonfinite_steps`` in a
  row stop the run with :class:`DivergedError`, and no checkpoint is written from a bad step;
* **saturation** — the fraction of merged elements clamped at ±448: warned above
  ``saturation_warn``, stops the run above ``saturation_abort`` when set;
* **stalls** — gradients exactly zero, or merges that round every update away, for several steps
  (the hint names the settings that keep what rounding drops).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from falqon_dist.train.config import TrainConfig

log = logging.getLogger("falqon_dist")

__all__ = ["DivergedError", "StepWatch"]

#: Consecutive steps whose merges change no FP8 weight, or whose gradients are all zero, before a warning.
STALL_STEPS = 5
#: At most one saturation warning per this many steps.
SATURATION_WARN_EVERY = 50


class DivergedError(RuntimeError):
    """The run produced non-finite values (or clamped too much) for too long and was stopped."""


class StepWatch:
    """Checks every step's record; warns on rank 0's log, raises :class:`DivergedError` to stop."""

    def __init__(self, train: TrainConfig) -> None:
        self.train = train
        self.nonfinite_steps = 0
        self._rounded_away = 0
        self._zero_grad = 0
        self._last_saturation_warning: int | None = None

    @property
    def last_step_bad(self) -> bool:
        """Whether the most recent step had non-finite values (then nothing may be saved from it)."""
        return self.nonfinite_steps > 0

    def check(
        self, step: int, record: dict[str, Any], *, last_checkpoint: Callable[[], str | None]
    ) -> None:
        """Warn or raise for ``step``'s ``record``; ``last_checkpoint()`` (only called to name it in an
        error) says where the last good state is."""
        self._check_nonfinite(step, record, last_checkpoint)
        self._check_saturation(step, record, last_checkpoint)
        self._check_stalls(step, record)

    def _check_nonfinite(
        self, step: int, record: dict[str, Any], last_checkpoint: Callable[[], str | None]
    ) -> None:
        loss, grad_norm, refused = (
            record["loss"],
            record.get("grad_norm"),
            record.get("nonfinite", 0),
        )
        problems = []
        if not math.isfinite(loss):
            problems.append(f"loss {loss}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            problems.append(f"gradient norm {grad_norm}")
        if refused:
            problems.append(
                f"{refused} merged FP8 elements with a non-finite update (refused; B's bad rows zeroed)"
            )
        self.nonfinite_steps = self.nonfinite_steps + 1 if problems else 0
        if not problems:
            return
        log.warning(
            "step %d: non-finite values: %s (%d/%d in a row before the run stops)",
            step,
            "; ".join(problems),
            self.nonfinite_steps,
            self.train.max_nonfinite_steps,
        )
        if self.nonfinite_steps >= self.train.max_nonfinite_steps:
            checkpoint = last_checkpoint()
            raise DivergedError(
                f"step {step}: {self.nonfinite_steps} consecutive steps with non-finite values "
                f"({'; '.join(problems)}); the run is diverging (train.lr={self.train.lr:g}). Nothing non-finite "
                f"was written into the FP8 backbone and no checkpoint was saved from these steps. "
                + (
                    f"Last good checkpoint: {checkpoint}; resume from it (train.resume=true) with a lower train.lr."
                    if checkpoint
                    else "No checkpoint was saved yet: restart with a lower train.lr."
                )
            )

    def _check_saturation(
        self, step: int, record: dict[str, Any], last_checkpoint: Callable[[], str | None]
    ) -> None:
        elements = record.get("elements")
        if not elements:
            return
        fraction = record.get("saturated", 0) / elements
        abort = self.train.saturation_abort
        if abort is not None and fraction > abort:
            checkpoint = last_checkpoint()
            raise DivergedError(
                f"step {step}: {100 * fraction:.2f}% of the merged FP8 elements clamped at ±448 "
                f"(train.saturation_abort={abort:g}): the weights are growing past the FP8 range (lower train.lr, "
                f"or method.scale_headroom). "
                + (f"Last checkpoint: {checkpoint}." if checkpoint else "")
            )
        last = self._last_saturation_warning
        recent = last is not None and step - last < SATURATION_WARN_EVERY
        if fraction > self.train.saturation_warn and not recent:
            self._last_saturation_warning = step
            log.warning(
                "step %d: %.2f%% of the merged FP8 elements clamped at ±448 (above train.saturation_warn=%g): the "
                "merged weights are leaving the FP8 range; lower train.lr or raise method.scale_headroom",
                step,
                100 * fraction,
                self.train.saturation_warn,
            )

    def _check_stalls(self, step: int, record: dict[str, Any]) -> None:
        after_warmup = step > (self.train.warmup_steps or 0)
        if "rows_merged" in record:  # a step that merged (method.merge_every may skip some)
            stalled = record["rows_merged"] and record.get("changed") == 0
            self._rounded_away = self._rounded_away + 1 if stalled else 0
        if self._rounded_away == STALL_STEPS and after_warmup:
            log.warning(
                "FALQON: %d steps in a row merged rows of B without changing a single FP8 weight: every "
                "update is below half an FP8 step and is rounded away (lr %.3g). FALQON needs far larger "
                "rates than LoRA (10-50x, see docs/method.md): raise train.lr, or keep what rounding drops in B "
                "(method.merge=every_row, the default, or topk_carry) or round stochastically instead "
                "(method.merge=topk_keep method.merge_rounding=stochastic)",
                STALL_STEPS,
                record["lr"],
            )
        self._zero_grad = self._zero_grad + 1 if record.get("grad_norm") == 0.0 else 0
        if self._zero_grad == STALL_STEPS and after_warmup:
            log.warning(
                "%d steps in a row with a gradient norm of exactly 0: training has stalled (saturated "
                "activations after a too-large train.lr=%g?)",
                STALL_STEPS,
                self.train.lr,
            )
