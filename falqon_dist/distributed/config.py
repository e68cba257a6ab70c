"""The DeepSpeed config as FALQON needs it: built from a run's settings, validated, defaults filled in.

* :class:`DeepSpeedConfig`: the Hydra ``deepspeed/`` group; :func:`check_zero_stage` is the one
  check of a ZeRO stage (0–3), for ``deepspeed.zero_stage`` and a DeepSpeed dict's
  ``zero_optimization.stage`` alike;
* :func:`build_ds_config`: a run's DeepSpeed config, the user's JSON (``deepspeed.config``) as the base
  and the run's settings on top. Built when the trainer starts, before any data or model is loaded: a
  JSON that FALQON cannot train with (``fp16``, ZeRO++ weight quantization, ...) or that contradicts
  the run's own settings (``zero_optimization.stage`` vs ``deepspeed.zero_stage``, ``bf16.enabled``
  vs ``model.dtype``) fails with one :class:`DeepSpeedConfigError` naming the file, the key and the
  fix, instead of DeepSpeed's own assertion after the model load, or a silent override;
* :func:`prepare_ds_config`: any DeepSpeed dict (a run's, or one a caller of
  :func:`~falqon_dist.distributed.initialize` wrote), checked for what FALQON cannot train with and
  completed with the framework's defaults.

What FALQON requires of DeepSpeed, and why each rejected setting would break it:

* ``fp16``: the FP8 backbone is trained through bf16 or fp32 activations; fp16 loss scaling skips
  steps and rescales gradients of B in ways the merge does not account for (not supported).
* ``zero_optimization.zero_quantized_weights`` / ``zero_quantized_nontrainable_weights``: ZeRO++
  would re-quantize the already-FP8 ``qweight`` bytes for the all-gather.
* ``zero_optimization.zero_hpz_partition_size`` > 1: a secondary partition copy of ``qweight``
  that the sharded merge would have to update too (not supported).
* ``zero_optimization.offload_param.device == "nvme"``: the merge edits partitions in memory.

Filled when absent: an AdamW optimizer, ``torch_adam`` for Adam/AdamW on the CPU accelerator and on
a GPU machine without ``nvcc`` (DeepSpeed's fused Adam is not built for the CPU accelerator and is
JIT-compiled with nvcc on CUDA: without it, the first step fails) and ``steps_per_print`` off.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from falqon_dist.config_checks import (
    InvalidField,
    check_choice,
    check_non_negative_int,
    check_number,
)

VALID_STAGES = (0, 1, 2, 3)

log = logging.getLogger("falqon_dist")


@dataclass(frozen=True)
class DeepSpeedConfig:
    """The Hydra ``deepspeed/`` group (``conf/deepspeed/default.yaml`` documents every field): the
    settings the framework writes into the DeepSpeed config, over the user's own JSON (``config``)."""

    zero_stage: int
    #: Gradient-norm clipping (0 = off).
    gradient_clipping: float
    #: ZeRO-3: parameters below this many elements stay resident on every rank.
    param_persistence_threshold: int
    #: The user's DeepSpeed JSON (None = none); read and validated by the trainer's preflight.
    config: Path | None = None

    def __post_init__(self) -> None:
        owner = "DeepSpeedConfig"
        check_zero_stage(owner, "zero_stage", self.zero_stage)
        check_number(owner, "gradient_clipping", self.gradient_clipping, 0.0)
        check_non_negative_int(
            owner, "param_persistence_threshold", self.param_persistence_threshold
        )
        if self.config is not None:
            if not isinstance(self.config, (str, Path)) or not str(self.config):
                raise InvalidField(
                    owner,
                    "config",
                    "must be null or the path of a DeepSpeed JSON file",
                    self.config,
                )
            object.__setattr__(self, "config", Path(str(self.config)).expanduser())


def check_zero_stage(owner: str, field: str, stage: Any) -> None:
    """The one check of a ZeRO stage, 0–3 (:class:`InvalidField` naming ``owner.field``): a run's
    ``deepspeed.zero_stage`` (:class:`DeepSpeedConfig`) and the ``zero_optimization.stage`` of a
    DeepSpeed dict handed to :func:`prepare_ds_config`."""
    check_choice(owner, field, stage, VALID_STAGES)


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config value that FALQON cannot train with; the message names the key."""


def _get(cfg: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def nvcc_available() -> bool:
    """Whether DeepSpeed could JIT-build its CUDA ops here: ``nvcc`` on PATH or under CUDA_HOME."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return shutil.which("nvcc") is not None or bool(
        cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    )


def prepare_ds_config(
    ds_config: dict[str, Any], *, on_cpu: bool, lr: float | None = None
) -> dict[str, Any]:
    """Validate ``ds_config`` for FALQON and return a copy with the framework's defaults filled in
    (``zero_optimization.stage`` absent: 0). A run's dict (:func:`build_ds_config`) carries the stage
    :class:`DeepSpeedConfig` checked; a caller's own dict is checked here."""
    if not isinstance(ds_config, dict):
        raise DeepSpeedConfigError(
            f"the DeepSpeed config must be a dict, got {type(ds_config).__name__}"
        )
    cfg = copy.deepcopy(ds_config)
    zero = cfg.setdefault("zero_optimization", {})
    try:
        check_zero_stage("zero_optimization", "stage", zero.setdefault("stage", 0))
    except InvalidField as exc:
        raise DeepSpeedConfigError(str(exc)) from None
    if _get(cfg, "fp16.enabled", False):
        raise DeepSpeedConfigError(
            "fp16.enabled=true is not supported with FALQON; use bf16.enabled=true or fp32"
        )
    for key in ("zero_quantized_weights", "zero_quantized_nontrainable_weights"):
        if zero.get(key, False):
            raise DeepSpeedConfigError(
                f"zero_optimization.{key}=true would re-quantize the FP8 backbone bytes; set it to false"
            )
    if zero.get("zero_hpz_partition_size", 1) not in (1, None):
        raise DeepSpeedConfigError(
            "zero_optimization.zero_hpz_partition_size must be 1 with FALQON (hierarchical partitions are not merged)"
        )
    if _get(cfg, "zero_optimization.offload_param.device") == "nvme":
        raise DeepSpeedConfigError(
            "zero_optimization.offload_param.device='nvme' is not supported with FALQON; use 'cpu' or 'none'"
        )
    if "pipeline" in cfg and cfg["pipeline"]:
        raise DeepSpeedConfigError("pipeline parallelism ('pipeline') is not supported with FALQON")
    optimizer = cfg.setdefault(
        "optimizer", {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}}
    )
    params = optimizer.setdefault("params", {})
    if lr is not None:
        params["lr"] = lr
    if (on_cpu or not nvcc_available()) and str(optimizer.get("type", "")).lower() in (
        "adam",
        "adamw",
    ):
        # DeepSpeed's fused Adam: not for CPU, JIT-built with nvcc on CUDA
        params.setdefault("torch_adam", True)
    cfg.setdefault("steps_per_print", 2**31 - 1)
    return cfg


def build_ds_config(
    settings: DeepSpeedConfig,
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    lr: float,
    weight_decay: float,
    bf16: bool,
) -> dict[str, Any]:
    """A run's DeepSpeed config: batch sizes, precision (``bf16``: ``model.dtype=bf16``), ZeRO stage,
    clipping and optimizer from the run's settings, on top of ``settings.config`` (the user's JSON).

    Raises :class:`DeepSpeedConfigError` naming the file and the key for a JSON that contradicts the
    run or that FALQON cannot train with; a batch or clipping value the JSON sets differently is
    overridden, with a warning.
    """
    base = (
        {}
        if settings.config is None
        else _read_user_json(settings.config, settings.zero_stage, bf16)
    )
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": settings.gradient_clipping,
        "bf16": {"enabled": bf16},
    }
    for key, value in ours.items():
        if key in base and base[key] != value and key != "bf16":
            log.warning(
                "deepspeed.config sets %s=%r; the run's setting %r takes precedence",
                key,
                base[key],
                value,
            )
    config = {**base, **ours}
    zero = dict(base.get("zero_optimization", {}))
    zero["stage"] = settings.zero_stage
    zero.setdefault("stage3_param_persistence_threshold", settings.param_persistence_threshold)
    config["zero_optimization"] = zero
    optimizer = dict(base.get("optimizer", {"type": "AdamW", "params": {}}))
    optimizer["params"] = {**optimizer.get("params", {}), "lr": lr, "weight_decay": weight_decay}
    config["optimizer"] = optimizer
    config.setdefault("wall_clock_breakdown", False)
    if settings.config is not None:
        try:
            prepare_ds_config(config, on_cpu=False)
        except DeepSpeedConfigError as exc:
            raise DeepSpeedConfigError(f"{_file_key(settings.config)}: {exc}") from None
    return config


def _file_key(path: Path) -> str:
    return f"deepspeed.config={str(path)!r}"


def _read_user_json(path: Path, zero_stage: int, bf16: bool) -> dict[str, Any]:
    """The user's DeepSpeed JSON, refused where it contradicts the run's own settings."""
    name = _file_key(path)
    try:
        base = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(base, dict):
        raise DeepSpeedConfigError(f"{name} must hold a JSON object")
    zero = base.get("zero_optimization", {})
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage is not None and stage != zero_stage:
        raise DeepSpeedConfigError(
            f"{name} sets zero_optimization.stage={stage!r} but deepspeed.zero_stage="
            f"{zero_stage}: the run sets the stage; pass deepspeed.zero_stage={stage!r} "
            f"or remove it from the file"
        )
    flag = base.get("bf16", {})
    if isinstance(flag, dict) and "enabled" in flag and bool(flag["enabled"]) != bf16:
        raise DeepSpeedConfigError(
            f"{name} sets bf16.enabled={str(bool(flag['enabled'])).lower()} but model.dtype="
            f"{'bf16' if bf16 else 'fp32'!r}: the run sets the precision; pass model.dtype="
            f"{'bf16' if flag['enabled'] else 'fp32'} or remove it from the file"
        )
    return base
