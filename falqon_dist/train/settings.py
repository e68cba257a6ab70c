"""The composed Hydra config, turned into typed settings before any work starts.

Each Hydra group maps onto its component's own frozen config class, which validates its fields
(:class:`~falqon_dist.train.config.TrainConfig`, :class:`~falqon_dist.models.config.ModelConfig`,
:class:`~falqon_dist.data.DataConfig`, the method's class in :mod:`falqon_dist.methods`,
:class:`~falqon_dist.fp8.config.Fp8Config`, :class:`~falqon_dist.distributed.config.DeepSpeedConfig`).
This module re-words their errors as the Hydra key (``train.micro_batch_size must be a positive
integer, got 0``) and checks only how the groups go together. It never looks at the machine or the
files, so a run's saved config validates anywhere (export, eval); what training needs of them is
checked by :func:`falqon_dist.train.preflight.preflight`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from falqon_dist.config_checks import InvalidField, check_choice, check_int, check_number, check_patterns
from falqon_dist.data import DataConfig
from falqon_dist.distributed.config import DeepSpeedConfig
from falqon_dist.fp8.config import Fp8Config
from falqon_dist.methods import METHODS, MethodConfig, method_config
from falqon_dist.models.config import ModelConfig
from falqon_dist.train.config import TrainConfig
from falqon_dist.train.wandb_logger import VALID_MODES

LOGGERS = ("none", "wandb", "tensorboard", "wandb_tensorboard")
#: Methods whose layers run FP8 GEMMs (and so use the ``fp8/`` group).
FP8_METHODS = ("falqon", "fp8_lora")
#: Keys of the ``method/`` group that belong to the run, not to the method's config class.
RUN_METHOD_KEYS = ("name", "lr", "target_modules", "exclude_modules")
#: Config fields the ``fp8/`` group supplies, by method (the same FP8 backend for every FP8 method).
FP8_FIELDS = {"falqon": ("backend",), "fp8_lora": ("backend",)}
#: What a run saved before a FALQON key existed ran with (its config.yaml lacks the key).
SAVED_CONFIG_DEFAULTS = {"falqon": {"topk": None, "unmerged": "discard", "carry_residual": False}}
#: Keys that moved: a saved config (or a command line) that still has the old one is read as the new.
MOVED_KEYS = {"fp8.cache_weight_transpose": "method.cache_weight_transpose"}


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""


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


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs, validated."""

    run_dir: Path
    seed: int
    train: TrainConfig
    method: MethodSettings
    model: ModelConfig
    data: DataConfig
    deepspeed: DeepSpeedConfig
    fp8: Fp8Config
    #: none | wandb | tensorboard | wandb_tensorboard (see :attr:`uses_wandb`, :attr:`uses_tensorboard`).
    logger: str
    wandb: dict[str, Any]
    export: bool
    #: Bound of every wait on other ranks (rendezvous, collectives, barriers, op builds), seconds.
    dist_timeout_s: float = 300.0

    @property
    def uses_wandb(self) -> bool:
        return self.logger in ("wandb", "wandb_tensorboard")

    @property
    def uses_tensorboard(self) -> bool:
        return self.logger in ("tensorboard", "wandb_tensorboard")


@contextlib.contextmanager
def _keys(prefix: str, fp8_fields: tuple[str, ...] = ()) -> Iterator[None]:
    """Re-word a config class's :class:`InvalidField` as the Hydra key ``<prefix><field>``."""
    try:
        yield
    except InvalidField as exc:
        key = f"fp8.{exc.field}" if exc.field in fp8_fields else f"{prefix}{exc.field}"
        raise ConfigError(f"{key} {exc.requirement}, got {exc.value!r}") from None
    except TypeError as exc:  # a saved config whose section has a key its class does not (or lacks one)
        raise ConfigError(f"{prefix.rstrip('.')}: {exc}") from None


def move_keys(tree: dict[str, Any]) -> list[str]:
    """Rewrite, in place, the keys of :data:`MOVED_KEYS` in a config tree saved before they moved;
    return what was moved (``old -> new``). A moved key the run's method does not have is dropped."""
    moved = []
    for old, new in MOVED_KEYS.items():
        (old_group, old_key), (new_group, new_key) = old.split("."), new.split(".")
        section = tree.get(old_group)
        if not isinstance(section, dict) or old_key not in section:
            continue
        value = section.pop(old_key)
        target = tree.setdefault(new_group, {})
        if new == "method.cache_weight_transpose" and target.get("name") != "falqon":
            continue
        target.setdefault(new_key, value)
        moved.append(f"{old} -> {new}")
    return moved


def _method(m: dict[str, Any], fp8: Fp8Config) -> MethodSettings:
    """The ``method/`` group (and the ``fp8/`` fields the method takes) as the method's own config."""
    with _keys(""):
        check_choice("", "method", m.get("name"), tuple(METHODS))
    name = m["name"]
    fields = {key: value for key, value in m.items() if key not in RUN_METHOD_KEYS}
    fields.update({key: getattr(fp8, key) for key in FP8_FIELDS.get(name, ())})
    for key, value in SAVED_CONFIG_DEFAULTS.get(name, {}).items():
        fields.setdefault(key, value)
    with _keys("method.", FP8_FIELDS.get(name, ())):
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
        with _keys("method."):
            check_patterns("", key, value)
        patterns[key] = value
    return MethodSettings(name=name, config=config, **patterns)


def _check_combinations(method: MethodSettings, deepspeed: DeepSpeedConfig, export: bool) -> None:
    """Combinations of groups that cannot work, rejected before any work starts."""
    if export and method.name != "falqon":
        raise ConfigError(
            f"export.enabled=true needs method=falqon, got method={method.name}: the export writes FALQON's "
            "FP8 backbone, and the other methods keep none (set export.enabled=false)"
        )
    if method.name == "qlora" and deepspeed.zero_stage == 3:
        raise ConfigError(
            "method=qlora needs deepspeed.zero_stage 0, 1 or 2, got deepspeed.zero_stage=3 (3 is the default): "
            "bitsandbytes 4-bit weights carry their quantization state (block scales, shape) as an attribute "
            "that ZeRO-3 partitioning does not preserve; add deepspeed.zero_stage=2"
        )
    if getattr(method.config, "cache_weight_transpose", False) and deepspeed.zero_stage == 3:
        raise ConfigError(
            "method.cache_weight_transpose=true needs deepspeed.zero_stage 0, 1 or 2, got 3: the cached copy of "
            "each layer's W rows would be a full, unpartitioned matrix on every rank (set it to false)"
        )


def _data(d: dict[str, Any], model: ModelConfig, seed: int) -> DataConfig:
    d.setdefault("max_length", model.max_length)
    d.setdefault("seed", seed)
    with _keys("data."):
        return DataConfig(**d)


def validate(cfg: DictConfig | dict) -> RunSettings:
    """Check every value of the composed config; raise :class:`ConfigError` on the first bad one."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    if OmegaConf.is_missing(cfg.data, "path"):
        raise ConfigError(f"data.path is required for data={cfg.data.name} (a local .jsonl/.json file or directory)")
    if cfg.data.get("name") == "mix" and OmegaConf.is_missing(cfg.data, "sources"):
        raise ConfigError("data.sources is required for data=mix: a list of {path, format, weight}, e.g. "
                          "'data.sources=[{path: a.jsonl, format: chat, weight: 2}, {path: b.txt, format: text}]'")
    tree = OmegaConf.to_container(cfg, resolve=True)
    move_keys(tree)
    run = tree["run"]
    if run.get("dir") is None:
        raise ConfigError("run.dir must be set (launch/train.py sets it for every rank)")
    with _keys("run."):
        check_int("", "seed", run.get("seed"))
    with _keys("model."):
        model = ModelConfig(**tree["model"])
    with _keys("fp8."):
        fp8 = Fp8Config(**tree["fp8"])
    method = _method(tree["method"], fp8)
    with _keys(""):
        logger = tree["logger"]["backend"]
        check_choice("", "logger", logger, LOGGERS)
        check_choice("", "wandb.mode", tree["wandb"].get("mode"), VALID_MODES)
    with _keys("deepspeed."):
        deepspeed = DeepSpeedConfig(**tree["deepspeed"])
    export = bool(tree["export"]["enabled"])
    _check_combinations(method, deepspeed, export)
    with _keys("train."):
        train = TrainConfig(**tree["train"])
    timeout = tree.get("dist", {}).get("timeout_s", 300.0)  # configs saved before dist.timeout_s have no `dist`
    with _keys("dist."):
        check_number("", "timeout_s", timeout, 0.0, low_open=True)
    return RunSettings(
        run_dir=Path(run["dir"]),
        seed=run["seed"],
        train=train,
        method=method,
        model=model,
        data=_data(tree["data"], model, run["seed"]),
        deepspeed=deepspeed,
        fp8=fp8,
        logger=logger,
        wandb=tree["wandb"],
        export=export,
        dist_timeout_s=float(timeout),
    )
