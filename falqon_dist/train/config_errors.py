"""The error every configuration check of a run raises, worded as the Hydra key.

Component config classes raise :class:`~falqon_dist.config_checks.InvalidField` in their own terms
(``TrainConfig.lr``); :func:`named_as` re-words it as the key a user types (``train.lr must be a
finite number > 0, got inf``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from falqon_dist.config_checks import InvalidField


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""


@contextlib.contextmanager
def named_as(prefix: str, fp8_fields: tuple[str, ...] = ()) -> Iterator[None]:
    """Re-word a config class's :class:`InvalidField` as the Hydra key ``<prefix><field>``
    (``fp8.<field>`` for the fields in ``fp8_fields``, which the ``fp8/`` group supplies)."""
    try:
        yield
    except InvalidField as exc:
        key = f"fp8.{exc.field}" if exc.field in fp8_fields else f"{prefix}{exc.field}"
        raise ConfigError(f"{key} {exc.requirement}, got {exc.value!r}") from None
    # a saved config whose section has a key its class does not (or lacks one)
    except TypeError as exc:
        raise ConfigError(f"{prefix.rstrip('.')}: {exc}") from None
