"""The field checks every frozen config class runs on construction, and the error they raise.

Each component owns its config (``FalqonConfig``, ``LoraConfig``, ``DataConfig``, ``TrainConfig``,
``ModelConfig``, ``Fp8Config``, ``DeepSpeedConfig``): a frozen dataclass whose ``__post_init__``
checks every field with these helpers. A bad value raises :class:`InvalidField`, whose parts let the
run's settings re-word it as the Hydra key (``train.lr must be a finite number > 0, got inf``).
"""

from __future__ import annotations

import math
import re
from typing import Any


class InvalidField(ValueError):
    """A config's field holds an invalid value: ``<Config>.<field> <requirement>, got <value>``.

    ``owner`` (the config class), ``field``, ``requirement`` and ``value`` let a caller re-word it in
    its own terms (the trainer names the Hydra key, ``method.rank``); a caller tells which field is to
    blame by ``field``, never by the message's text."""

    def __init__(self, owner: str, field: str, requirement: str, value: Any) -> None:
        self.owner, self.field, self.requirement, self.value = owner, field, requirement, value
        super().__init__(f"{owner}.{field} {requirement}, got {value!r}")


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML's ``true`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(owner: str, field: str, value: Any) -> None:
    if not is_int(value) or value <= 0:
        raise InvalidField(owner, field, "must be a positive integer", value)


def check_non_negative_int(owner: str, field: str, value: Any) -> None:
    if not is_int(value) or value < 0:
        raise InvalidField(owner, field, "must be a non-negative integer", value)


def check_int(owner: str, field: str, value: Any) -> None:
    if not is_int(value):
        raise InvalidField(owner, field, "must be an integer", value)


def check_number(
    owner: str,
    field: str,
    value: Any,
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A finite number between ``low`` and ``high`` (each bound closed unless ``*_open``). NaN and
    ±inf are never valid: ``train.lr=inf`` would put NaN into every merge."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        if high is None:
            bound = f"{'>' if low_open else '>='} {low:g}"
        else:
            bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise InvalidField(owner, field, f"must be a finite number {bound}", value)


def check_bool(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidField(owner, field, "must be true or false", value)


def check_choice(owner: str, field: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise InvalidField(owner, field, f"must be one of {valid}", value)


def check_patterns(owner: str, field: str, value: Any) -> None:
    """None, or a non-empty tuple of module names / dotted suffixes / regular expressions."""
    if value is None:
        return
    if (
        not isinstance(value, tuple)
        or not value
        or not all(isinstance(item, str) and item for item in value)
    ):
        raise InvalidField(
            owner,
            field,
            "must be null or a list of module names or regexes, e.g. [q_proj,v_proj]",
            value,
        )
    for item in value:
        try:
            re.compile(item)
        except re.error as error:
            raise InvalidField(
                owner,
                field,
                f"holds {item!r}, which is not a valid regular expression ({error})",
                value,
            ) from None
