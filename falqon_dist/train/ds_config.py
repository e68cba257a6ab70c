"""The DeepSpeed config of a run: the user's JSON as the base, the run's settings on top.

Built and validated when the trainer starts, before any data or model is loaded: a JSON that
FALQON cannot train with (``fp16``, ZeRO++ weight quantization, ...) or that contradicts the run's
own settings (``zero_optimization.stage`` vs ``deepspeed.zero_stage``, ``bf16.enabled`` vs
``model.dtype``) fails with one line naming the file, the key and the fix, instead of DeepSpeed's own
assertion after the model load, or a silent override.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from falqon_dist.distributed import DeepSpeedConfigError, prepare_ds_config
from falqon_dist.train.settings import ConfigError, RunSettings

log = logging.getLogger("falqon_dist")


def build_ds_config(settings: RunSettings, world_size: int) -> dict[str, Any]:
    """Batch sizes, precision, ZeRO stage, clipping and optimizer from the run settings, on top of
    ``deepspeed.config``; raises :class:`ConfigError` naming the file and key for a JSON that
    contradicts the run or that FALQON cannot train with."""
    ds = settings.deepspeed
    base: dict[str, Any] = {}
    if ds.config is not None:
        base = _read_user_json(settings)
    train = settings.train
    ours = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": ds.gradient_clipping,
        "bf16": {"enabled": settings.model.dtype == "bf16"},
    }
    for key, value in ours.items():
        if key in base and base[key] != value and key != "bf16":
            log.warning("deepspeed.config sets %s=%r; the run's setting %r takes precedence", key, base[key], value)
    config = {**base, **ours}
    zero = dict(base.get("zero_optimization", {}))
    zero["stage"] = ds.zero_stage
    zero.setdefault("stage3_param_persistence_threshold", ds.param_persistence_threshold)
    config["zero_optimization"] = zero
    optimizer = dict(base.get("optimizer", {"type": "AdamW", "params": {}}))
    optimizer["params"] = {**optimizer.get("params", {}), "lr": train.lr, "weight_decay": train.weight_decay}
    config["optimizer"] = optimizer
    config.setdefault("wall_clock_breakdown", False)
    if ds.config is not None:
        try:
            prepare_ds_config(config, on_cpu=False)
        except DeepSpeedConfigError as exc:
            raise ConfigError(f"deepspeed.config={str(ds.config)!r}: {exc}") from None
    return config


def _read_user_json(settings: RunSettings) -> dict[str, Any]:
    """The user's DeepSpeed JSON, refused where it contradicts the run's own settings."""
    path = settings.deepspeed.config
    name = f"deepspeed.config={str(path)!r}"
    try:
        base = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(base, dict):
        raise ConfigError(f"{name} must hold a JSON object")
    zero = base.get("zero_optimization", {})
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage is not None and stage != settings.deepspeed.zero_stage:
        raise ConfigError(f"{name} sets zero_optimization.stage={stage!r} but deepspeed.zero_stage="
                          f"{settings.deepspeed.zero_stage}: the run sets the stage; pass deepspeed.zero_stage={stage!r} "
                          f"or remove it from the file")  # fmt: skip
    bf16 = base.get("bf16", {})
    wanted = settings.model.dtype == "bf16"
    if isinstance(bf16, dict) and "enabled" in bf16 and bool(bf16["enabled"]) != wanted:
        raise ConfigError(f"{name} sets bf16.enabled={str(bool(bf16['enabled'])).lower()} but model.dtype="
                          f"{settings.model.dtype!r}: the run sets the precision; pass model.dtype="
                          f"{'bf16' if bf16['enabled'] else 'fp32'} or remove it from the file")  # fmt: skip
    return base
