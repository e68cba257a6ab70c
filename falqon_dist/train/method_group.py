"""The ``method/`` Hydra group as the method's own typed config and the layers it adapts.

Each file of ``conf/method/`` holds exactly its config class's fields (:mod:`falqon_dist.methods`)
plus the run's keys (:data:`RUN_METHOD_KEYS`: which method, its learning rate, its layers); FP8
methods also take the ``fp8/`` group's backend (:data:`FP8_FIELDS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from falqon_dist.config_checks import InvalidField, check_choice, check_patterns
from falqon_dist.fp8.config import Fp8Config
from falqon_dist.methods import METHODS, MethodConfig, method_config
from falqon_dist.train.config_errors import ConfigError, named_as

#: Methods whose layers run FP8 GEMMs (and so use the ``fp8/`` group).
FP8_METHODS = ("falqon", "fp8_lora")
#: Keys of the ``method/`` group that belong to the run, not to the method's config class.
RUN_METHOD_KEYS = ("name", "lr", "target_modules", "exclude_modules")
#: Config fields the ``fp8/`` group supplies, by method (the same FP8 backend for every FP8 method).
FP8_FIELDS = {"falqon": ("backend",), "fp8_lora": ("backend",)}


@dataclass(frozen=True)
class MethodSettings:
    """The method a run trains with: its typed, validated config (see :mod:`falqon_dist.methods`)
    and the layers it adapts."""

    name: str
    config: MethodConfig
    #: Layers adapted (names, dotted suffixes or regexes; None = every eligible nn.Linear but lm_head),
    #: minus those matching exclude_modules. The same for every method but full.
    target_modules: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] | None = None


def method_settings(m: dict[str, Any], fp8: Fp8Config) -> MethodSettings:
    """The ``method/`` group (and the ``fp8/`` fields the method takes) as the method's own config.

    ``m`` is read as it is: keys from older configs were rewritten before
    (:func:`~falqon_dist.train.config_migrations.move_keys`)."""
    with named_as(""):
        check_choice("", "method", m.get("name"), tuple(METHODS))
    name = m["name"]
    fields = {key: value for key, value in m.items() if key not in RUN_METHOD_KEYS}
    fields.update({key: getattr(fp8, key) for key in FP8_FIELDS.get(name, ())})
    with named_as("method.", FP8_FIELDS.get(name, ())):
        try:
            config = method_config(name, fields)
        except InvalidField:
            raise
        except ValueError as exc:  # a key of the method group that its config class does not have
            raise ConfigError(f"method={name}: {exc}") from None
    patterns = {}
    for key in ("target_modules", "exclude_modules"):
        value = m.get(key)
        value = tuple(value) if isinstance(value, list) else value
        with named_as("method."):
            check_patterns("", key, value)
        patterns[key] = value
    return MethodSettings(name=name, config=config, **patterns)
