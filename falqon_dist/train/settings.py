"""The composed Hydra config, turned into typed settings before any work starts.

Each Hydra group maps onto its component's own frozen config class, which validates its fields
(:class:`~falqon_dist.train.config.TrainConfig`, :class:`~falqon_dist.models.config.ModelConfig`,
:class:`~falqon_dist.data.DataConfig`, the method's class in :mod:`falqon_dist.methods`,
:class:`~falqon_dist.fp8.config.Fp8Config`, :class:`~falqon_dist.distributed.config.DeepSpeedConfig`).
This module re-words their errors as the Hydra key (``train.micro_batch_size must be a positive
integer, got 0``; :mod:`~falqon_dist.train.config_errors`), reads the ``method/`` group through
:mod:`~falqon_dist.train.method_group` and older configs through
:mod:`~falqon_dist.train.config_migrations`, and checks only how the groups go together. It never
looks at the machine or the files, so a run's saved config validates anywhere (export, eval); what
training needs of them is checked by :func:`falqon_dist.train.preflight.preflight`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from falqon_dist.config_checks import check_bool, check_choice, check_int, check_number
from falqon_dist.data import DataConfig
from falqon_dist.distributed.config import DeepSpeedConfig
from falqon_dist.fp8.config import Fp8Config
from falqon_dist.models.config import ModelConfig
from falqon_dist.train.config import TrainConfig
from falqon_dist.train.config_errors import ConfigError, named_as
from falqon_dist.train.config_migrations import move_keys
from falqon_dist.train.method_group import MethodSettings, method_settings
from falqon_dist.train.wandb_logger import VALID_MODES

__all__ = ["LOGGERS", "ConfigError", "RunSettings", "validate"]

LOGGERS = ("none", "wandb", "tensorboard", "wandb_tensorboard")


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
    #: ``run.overwrite``: a fresh run into a run.dir that holds a run moves that run aside first
    #: (:func:`falqon_dist.train.run_dir.prepare_run_dir`); false (also for configs saved before the
    #: key existed): such a run is refused.
    run_overwrite: bool = False

    @property
    def uses_wandb(self) -> bool:
        return self.logger in ("wandb", "wandb_tensorboard")

    @property
    def uses_tensorboard(self) -> bool:
        return self.logger in ("tensorboard", "wandb_tensorboard")


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
    with named_as("data."):
        return DataConfig(**d)


def validate(cfg: DictConfig | dict) -> RunSettings:
    """Check every value of the composed config; raise :class:`ConfigError` on the first bad one."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    if OmegaConf.is_missing(cfg.data, "path"):
        raise ConfigError(
            f"data.path is required for data={cfg.data.name} (a local .jsonl/.json file or directory)"
        )
    if cfg.data.get("name") == "mix" and OmegaConf.is_missing(cfg.data, "sources"):
        raise ConfigError(
            "data.sources is required for data=mix: a list of {path, format, weight}, e.g. "
            "'data.sources=[{path: a.jsonl, format: chat, weight: 2}, {path: b.txt, format: text}]'"
        )
    tree = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    move_keys(tree)
    run = tree["run"]
    if run.get("dir") is None:
        raise ConfigError("run.dir must be set (launch/train.py sets it for every rank)")
    overwrite = run.get("overwrite", False)  # configs saved before run.overwrite have none
    with named_as("run."):
        check_int("", "seed", run.get("seed"))
        check_bool("", "overwrite", overwrite)
    with named_as("model."):
        model = ModelConfig(**tree["model"])
    with named_as("fp8."):
        fp8 = Fp8Config(**tree["fp8"])
    method = method_settings(tree["method"], fp8)
    with named_as(""):
        logger = tree["logger"]["backend"]
        check_choice("", "logger", logger, LOGGERS)
        check_choice("", "wandb.mode", tree["wandb"].get("mode"), VALID_MODES)
    with named_as("deepspeed."):
        deepspeed = DeepSpeedConfig(**tree["deepspeed"])
    export = bool(tree["export"]["enabled"])
    _check_combinations(method, deepspeed, export)
    with named_as("train."):
        train = TrainConfig(**tree["train"])
    if train.resume and overwrite:
        raise ConfigError(
            "train.resume=true and run.overwrite=true contradict each other: train.resume=true "
            "continues the run in run.dir, run.overwrite=true moves it aside to start over; "
            "set one of them to false"
        )
    # configs saved before dist.timeout_s have no `dist`
    timeout = tree.get("dist", {}).get("timeout_s", 300.0)
    with named_as("dist."):
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
        run_overwrite=overwrite,
    )
