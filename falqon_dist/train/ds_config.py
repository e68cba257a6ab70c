"""The DeepSpeed config of a run: the user's JSON as the base, the run's settings on top."""

from __future__ import annotations

import json
import logging
from typing import Any

from falqon_dist.train.settings import ConfigError, RunSettings

log = logging.getLogger("falqon_dist")


def build_ds_config(settings: RunSettings, world_size: int) -> dict[str, Any]:
    """Batch sizes, precision, ZeRO stage, clipping and optimizer from the run settings."""
    ds = settings.deepspeed
    base: dict[str, Any] = {}
    if ds.config is not None:
        try:
            base = json.loads(ds.config.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deepspeed.config={str(ds.config)!r} is not valid JSON: {exc}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"deepspeed.config={str(ds.config)!r} must hold a JSON object")
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
    return config
