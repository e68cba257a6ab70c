"""The DeepSpeed config as FALQON needs it: validated, with the framework's defaults filled in.

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
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from falqon_dist.config_checks import InvalidField, check_choice, check_non_negative_int, check_number

VALID_STAGES = (0, 1, 2, 3)


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
        check_choice(owner, "zero_stage", self.zero_stage, VALID_STAGES)
        check_number(owner, "gradient_clipping", self.gradient_clipping, 0.0)
        check_non_negative_int(owner, "param_persistence_threshold", self.param_persistence_threshold)
        if self.config is not None:
            if not isinstance(self.config, (str, Path)) or not str(self.config):
                raise InvalidField(owner, "config", "must be null or the path of a DeepSpeed JSON file", self.config)
            object.__setattr__(self, "config", Path(str(self.config)).expanduser())


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
    return shutil.which("nvcc") is not None or bool(cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")))


def prepare_ds_config(ds_config: dict[str, Any], *, on_cpu: bool, lr: float | None = None) -> dict[str, Any]:
    """Validate ``ds_config`` for FALQON and return a copy with the framework's defaults filled in."""
    if not isinstance(ds_config, dict):
        raise DeepSpeedConfigError(f"the DeepSpeed config must be a dict, got {type(ds_config).__name__}")
    cfg = copy.deepcopy(ds_config)
    zero = cfg.setdefault("zero_optimization", {})
    stage = zero.setdefault("stage", 0)
    if stage not in VALID_STAGES:
        raise DeepSpeedConfigError(f"zero_optimization.stage must be one of {VALID_STAGES}, got {stage!r}")
    if _get(cfg, "fp16.enabled", False):
        raise DeepSpeedConfigError("fp16.enabled=true is not supported with FALQON; use bf16.enabled=true or fp32")
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
    optimizer = cfg.setdefault("optimizer", {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}})
    params = optimizer.setdefault("params", {})
    if lr is not None:
        params["lr"] = lr
    if (on_cpu or not nvcc_available()) and str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
        params.setdefault("torch_adam", True)  # DeepSpeed's fused Adam: not for CPU, JIT-built with nvcc on CUDA
    cfg.setdefault("steps_per_print", 2**31 - 1)
    return cfg
