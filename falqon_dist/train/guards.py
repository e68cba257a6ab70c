"""Former home of the step watch and the preemption handler: now :mod:`falqon_dist.train.divergence`
(:class:`StepWatch`, :class:`DivergedError`) and :mod:`falqon_dist.train.preemption`
(:class:`Preemption`, :class:`Preempted`). Delete this module once nothing imports it."""

from falqon_dist.train.divergence import DivergedError, StepWatch
from falqon_dist.train.preemption import Preempted, Preemption

__all__ = ["DivergedError", "Preempted", "Preemption", "StepWatch"]
