"""Mix several datasets by weight (``data=mix``), the same way on every rank.

Source ``i`` holds ``n_i`` training records and has weight ``w_i``. The mixture holds as many
training records as the sources together, ``N = Σ n_i``, of which source ``i`` gives

    m_i = N · w_i / Σ_j w_j        (largest-remainder rounding, so Σ m_i = N exactly)

records: all of its records ``⌊m_i / n_i⌋`` times, plus ``m_i mod n_i`` distinct ones drawn at
random. A source is thus sampled down when its share is below its size and repeated when above;
weights 1, 1, … keep every record once. The mixture is then shuffled. Every draw comes from a
``random.Random`` seeded by the data seed and the source's position (no global RNG, no hash order),
so every rank, and every rerun with the same seed, builds the same list.

Eval records are not re-weighted: the sources' eval sets are interleaved (the first record of each
source, then the second of each, …), so the prefix the trainer evaluates (``train.eval_samples``)
covers every source, and each source's loss is reported on its own too (``eval_loss/<name>``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class MixShare:
    """What one source contributed to a mixture (logged at start-up)."""

    #: Its metric name (``eval_loss/<name>``) and its path(s), as configured.
    name: str
    label: str
    #: Its row format (``alpaca``, ``chat``, …).
    format: str
    weight: float
    #: Training records the source holds, and how many the mixture took (with repeats).
    available: int
    taken: int
    #: Its eval records (all kept).
    eval_records: int

    def describe(self) -> str:
        return (
            f"{self.name} = {self.label} ({self.format}, weight {self.weight:g}): {self.taken} train records from "
            f"{self.available} (x{self.taken / self.available:.2f}), {self.eval_records} eval"
        )


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainder, ties to
    the earlier source), summing to exactly ``total``."""
    if not weights or any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    scale = total / sum(weights)
    exact = [w * scale for w in weights]
    parts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def sample(records: Sequence[T], count: int, rng: random.Random) -> list[T]:
    """``count`` records: every record ``count // len`` times, then ``count % len`` distinct ones."""
    repeats, rest = divmod(count, len(records))
    return list(records) * repeats + rng.sample(list(records), rest)


def interleave(parts: Sequence[Sequence[T]]) -> list[T]:
    """Round-robin over ``parts``: first of each, second of each, … (a shorter part just ends)."""
    longest = max((len(part) for part in parts), default=0)
    return [part[i] for i in range(longest) for part in parts if i < len(part)]


def mix(
    train_parts: Sequence[Sequence[T]], weights: Sequence[float], seed: int
) -> tuple[list[T], list[int]]:
    """The shuffled weighted mixture of ``train_parts`` and how many records each part gave."""
    if len(train_parts) != len(weights) or any(not part for part in train_parts):
        raise ValueError("need one weight per source and at least one record in every source")
    counts = apportion(sum(len(part) for part in train_parts), weights)
    mixed: list[T] = []
    for index, (part, count) in enumerate(zip(train_parts, counts, strict=True)):
        mixed += sample(part, count, random.Random(f"falqon_dist.mix:{seed}:{index}"))
    random.Random(f"falqon_dist.mix:{seed}:order").shuffle(mixed)
    return mixed, counts
