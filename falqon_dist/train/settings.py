"""The composed Hydra config, validated and turned into typed settings before any work starts.

Hydra already rejects unknown keys (the config is in struct mode). This module checks values and
how they go together, and raises :class:`ConfigError` naming the key and what would be valid, e.g.
``train.micro_batch_size must be a positive integer, got 0``. It never looks at the machine or the
files, so a run's saved config validates anywhere (export, eval); what training needs of them is
checked by :func:`falqon_dist.train.preflight.preflight`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from falqon_dist.data import DataConfig
from falqon_dist.fp8 import BACKEND_NAMES
from falqon_dist.fp8.cast import CAST_KERNELS
from falqon_dist.method.config import InvalidField
from falqon_dist.methods import METHODS, MethodConfig, method_config
from falqon_dist.train.wandb_logger import VALID_MODES

DTYPES = ("bf16", "fp32")
SCHEDULES = ("constant", "cosine", "linear")
LOGGERS = ("none", "wandb")
#: Methods whose layers run FP8 GEMMs (and so use fp8.backend).
FP8_METHODS = ("falqon", "fp8_lora")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""


def _positive_int(value: Any, key: str, *, allow_zero: bool = False) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ConfigError(f"{key} must be {kind} integer, got {value!r}")
    return value


def _number(value: Any, key: str, low: float, high: float | None = None) -> float:
    """A finite number in ``[low, high]`` (NaN and ±inf are never valid: ``train.lr=inf`` would put
    NaN into every merge)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{key} must be a finite number {bound}, got {value!r}")
    return float(value)


def _positive_number(value: Any, key: str) -> float:
    if _number(value, key, 0.0) <= 0:
        raise ConfigError(f"{key} must be a number > 0, got {value!r}")
    return float(value)


def _choice(value: Any, key: str, valid: tuple) -> Any:
    if value not in valid:
        raise ConfigError(f"{key} must be one of {valid}, got {value!r}")
    return value


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int
    micro_batch_size: int
    grad_accum: int
    lr: float
    warmup_steps: int
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
    #: Consecutive steps with a non-finite loss, gradient norm or merge before the run stops.
    max_nonfinite_steps: int = 3
    #: Fraction of merged FP8 elements clamped at ±448 in a step above which a warning is logged,
    #: and (when set) above which the run stops.
    saturation_warn: float = 0.01
    saturation_abort: float | None = None


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
class ModelSettings:
    name: str
    name_or_path: str | None
    dtype: str
    max_length: int
    gradient_checkpointing: bool


@dataclass(frozen=True)
class DeepSpeedSettings:
    zero_stage: int
    gradient_clipping: float
    param_persistence_threshold: int
    config: Path | None


@dataclass(frozen=True)
class Fp8Settings:
    backend: str
    #: How dynamic FP8 casts run: "compiled" (fused by torch.compile) or "eager" (op by op, same bits).
    cast: str
    #: FALQON only: keep a transposed copy of the W rows for the ∂L/∂x GEMM (ZeRO 0–2).
    cache_weight_transpose: bool


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs, validated."""

    run_dir: Path
    seed: int
    train: TrainSettings
    method: MethodSettings
    model: ModelSettings
    data: DataConfig
    deepspeed: DeepSpeedSettings
    fp8: Fp8Settings
    logger: str
    wandb: dict[str, Any]
    export: bool
    #: Bound of every wait on other ranks (rendezvous, collectives, barriers, op builds), seconds.
    dist_timeout_s: float = 300.0


def _warmup_steps(t: DictConfig) -> int:
    """``train.warmup_steps`` when given, else ``train.warmup_ratio`` × ``train.max_steps`` (rounded)."""
    ratio = _number(t.get("warmup_ratio", 0.0), "train.warmup_ratio", 0.0, 1.0)  # absent from older configs
    if ratio >= 1.0:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {ratio!r}")
    if t.warmup_steps is not None:
        return _positive_int(t.warmup_steps, "train.warmup_steps", allow_zero=True)
    return round(ratio * _positive_int(t.max_steps, "train.max_steps"))


def _train(t: DictConfig) -> TrainSettings:
    resume = t.resume
    if not isinstance(resume, bool):
        raise ConfigError(f"train.resume must be true or false, got {resume!r}")
    return TrainSettings(
        max_steps=_positive_int(t.max_steps, "train.max_steps"),
        micro_batch_size=_positive_int(t.micro_batch_size, "train.micro_batch_size"),
        grad_accum=_positive_int(t.grad_accum, "train.grad_accum"),
        lr=_positive_number(t.lr, "train.lr"),
        warmup_steps=_warmup_steps(t),
        schedule=_choice(t.schedule, "train.schedule", SCHEDULES),
        min_lr_ratio=_number(t.min_lr_ratio, "train.min_lr_ratio", 0.0, 1.0),
        weight_decay=_number(t.weight_decay, "train.weight_decay", 0.0),
        save_every=_positive_int(t.save_every, "train.save_every", allow_zero=True),
        keep_checkpoints=_positive_int(t.keep_checkpoints, "train.keep_checkpoints"),
        eval_every=_positive_int(t.eval_every, "train.eval_every", allow_zero=True),
        eval_samples=_positive_int(t.eval_samples, "train.eval_samples", allow_zero=True),
        eval_generate_samples=_positive_int(t.eval_generate_samples, "train.eval_generate_samples", allow_zero=True),
        resume=resume,
        log_every=_positive_int(t.log_every, "train.log_every"),
        # .get(): configs saved before these keys existed
        max_nonfinite_steps=_positive_int(t.get("max_nonfinite_steps", 3), "train.max_nonfinite_steps"),
        saturation_warn=_number(t.get("saturation_warn", 0.01), "train.saturation_warn", 0.0, 1.0),
        saturation_abort=None if t.get("saturation_abort") is None
        else _number(t.saturation_abort, "train.saturation_abort", 0.0, 1.0),
    )


#: Keys of the ``method/`` group that belong to the run, not to the method's config class.
RUN_METHOD_KEYS = ("name", "lr", "target_modules", "exclude_modules")
#: Config fields the ``fp8/`` group supplies, by method (the same FP8 backend for every FP8 method).
FP8_FIELDS = {"falqon": ("backend", "cache_weight_transpose"), "fp8_lora": ("backend",)}
#: What a run saved before a FALQON key existed ran with (its config.yaml lacks the key).
SAVED_CONFIG_DEFAULTS = {"falqon": {"topk": None, "unmerged": "discard", "carry_residual": False}}


def _method(m: DictConfig, fp8: DictConfig) -> MethodSettings:
    """The ``method/`` group (and the ``fp8/`` fields the method takes) as the method's own config
    class, which validates every value; its errors are re-worded to name the Hydra key."""
    name = _choice(m.name, "method", tuple(METHODS))
    fields = {key: m[key] for key in m if key not in RUN_METHOD_KEYS}
    fields.update({key: fp8[key] for key in FP8_FIELDS.get(name, ()) if key in fp8})
    for key, value in SAVED_CONFIG_DEFAULTS.get(name, {}).items():
        fields.setdefault(key, value)
    try:
        config = method_config(name, fields)
    except InvalidField as exc:
        key = f"fp8.{exc.field}" if exc.field in FP8_FIELDS.get(name, ()) else f"method.{exc.field}"
        raise ConfigError(f"{key} {exc.requirement}, got {exc.value!r}") from None
    except ValueError as exc:  # a key of the method group that its config class does not have
        raise ConfigError(f"method={name}: {exc}") from None
    return MethodSettings(
        name=name,
        config=config,
        target_modules=_patterns(m.get("target_modules"), "method.target_modules"),
        exclude_modules=_patterns(m.get("exclude_modules"), "method.exclude_modules"),
    )


def _patterns(value: Any, key: str) -> tuple[str, ...] | None:
    """null, or a non-empty list of module names / dotted suffixes / regular expressions."""
    if value is None:
        return None
    items = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else None
    if not items or not all(isinstance(item, str) and item for item in items):
        raise ConfigError(f"{key} must be null or a list of module names or regexes, e.g. [q_proj,v_proj], got {value!r}")
    for item in items:
        try:
            re.compile(item)
        except re.error as error:
            raise ConfigError(f"{key}: {item!r} is not a valid regular expression ({error})") from None
    return tuple(items)


def _check_method_fits(method: MethodSettings, deepspeed: DeepSpeedSettings, export: bool) -> None:
    """Combinations that cannot work, rejected before any work starts."""
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


def _fp8(f: DictConfig, method: MethodSettings, deepspeed: DeepSpeedSettings) -> Fp8Settings:
    backend = _choice(f.backend, "fp8.backend", BACKEND_NAMES)
    cache = f.get("cache_weight_transpose", False)  # absent from configs saved before it existed
    if not isinstance(cache, bool):
        raise ConfigError(f"fp8.cache_weight_transpose must be true or false, got {cache!r}")
    if cache and method.name == "falqon" and deepspeed.zero_stage == 3:
        raise ConfigError(
            "fp8.cache_weight_transpose=true needs deepspeed.zero_stage 0, 1 or 2, got 3: the cached copy of "
            "each layer's W rows would be a full, unpartitioned matrix on every rank (set it to false)"
        )
    cast = _choice(f.get("cast", "compiled"), "fp8.cast", CAST_KERNELS)  # absent from older saved configs
    return Fp8Settings(backend=backend, cast=cast, cache_weight_transpose=cache)


def _model(m: DictConfig) -> ModelSettings:
    path = m.name_or_path
    if path is not None and (not isinstance(path, str) or not path):
        raise ConfigError(f"model.name_or_path must be null (embedded tiny model) or a hub name / directory, got {path!r}")
    return ModelSettings(
        name=str(m.name),
        name_or_path=path,
        dtype=_choice(m.dtype, "model.dtype", DTYPES),
        max_length=_positive_int(m.max_length, "model.max_length"),
        gradient_checkpointing=bool(m.gradient_checkpointing),
    )


def _data(d: DictConfig, max_length: int, seed: int) -> DataConfig:
    if OmegaConf.is_missing(d, "path"):
        raise ConfigError(f"data.path is required for data={d.name} (a local .jsonl/.json file or directory)")
    fields = OmegaConf.to_container(d, resolve=True)
    fields.setdefault("max_length", max_length)
    fields.setdefault("seed", seed)
    try:
        return DataConfig(**fields)
    except TypeError as exc:
        raise ConfigError(f"data: {exc}") from None
    except ValueError as exc:
        raise ConfigError(str(exc).replace("DataConfig.", "data.")) from None


def _deepspeed(d: DictConfig) -> DeepSpeedSettings:
    stage = _choice(d.zero_stage, "deepspeed.zero_stage", (0, 1, 2, 3))
    config = None if d.config is None else Path(str(d.config)).expanduser()
    return DeepSpeedSettings(
        zero_stage=stage,
        gradient_clipping=_number(d.gradient_clipping, "deepspeed.gradient_clipping", 0.0),
        param_persistence_threshold=_positive_int(
            d.param_persistence_threshold, "deepspeed.param_persistence_threshold", allow_zero=True
        ),
        config=config,
    )


def validate(cfg: DictConfig) -> RunSettings:
    """Check every value of the composed config; raise :class:`ConfigError` on the first bad one."""
    if cfg.run.dir is None:
        raise ConfigError("run.dir must be set (launch/train.py sets it for every rank)")
    seed = cfg.run.seed
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"run.seed must be an integer, got {seed!r}")
    model = _model(cfg.model)
    _choice(cfg.fp8.backend, "fp8.backend", BACKEND_NAMES)  # named as the fp8 key, before the method reads it
    method = _method(cfg.method, cfg.fp8)
    logger = _choice(cfg.logger.backend, "logger", LOGGERS)
    wandb_settings = OmegaConf.to_container(cfg.wandb, resolve=True)
    _choice(wandb_settings.get("mode"), "wandb.mode", VALID_MODES)
    deepspeed = _deepspeed(cfg.deepspeed)
    export = bool(cfg.export.enabled)
    _check_method_fits(method, deepspeed, export)
    fp8 = _fp8(cfg.fp8, method, deepspeed)
    return RunSettings(
        run_dir=Path(cfg.run.dir),
        seed=seed,
        train=_train(cfg.train),
        method=method,
        model=model,
        data=_data(cfg.data, model.max_length, seed),
        deepspeed=deepspeed,
        fp8=fp8,
        logger=logger,
        wandb=wandb_settings,
        export=export,
        # configs saved before dist.timeout_s existed have no `dist` section
        dist_timeout_s=_positive_number(cfg.get("dist", {}).get("timeout_s", 300.0), "dist.timeout_s"),
    )
