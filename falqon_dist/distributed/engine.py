"""``initialize``: the DeepSpeed engine for a converted model, with FALQON's config checks and safe loads.

The engine is DeepSpeed's own: FALQON's merge is not hidden in its ``step()``. The loop that steps it
calls the method's post-optimizer hook (:class:`~falqon_dist.distributed.merge_hook.ProxyMergeHook`,
built by :func:`falqon_dist.methods.post_optimizer_hook`) right after ``engine.step()`` whenever
``engine.global_steps`` advanced.
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.engine import DeepSpeedEngine
from torch import nn

from falqon_dist.distributed.config import prepare_ds_config
from falqon_dist.distributed.safe_load import use_safe_loads


def initialize(
    model: nn.Module,
    ds_config: dict[str, Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler=None,
    lr: float | None = None,
) -> DeepSpeedEngine:
    """Wrap a converted model in DeepSpeed and return the engine.

    ``ds_config`` is validated (a bad value raises :class:`DeepSpeedConfigError` naming the key) and
    completed with what FALQON needs; only trainable parameters (the B proxies, for FALQON) are
    handed to the optimizer. ``lr`` overrides the optimizer's learning rate in the config. The
    engine's ``load_checkpoint`` reads with ``weights_only=True``. Pipeline and hybrid engines are
    refused (``ValueError``).
    """
    config = prepare_ds_config(ds_config, on_cpu=get_accelerator().device_name() == "cpu", lr=lr)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            "the model has no trainable parameters: convert it (or unfreeze it) before initialize()"
        )
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=config,
    )
    if type(engine) is not DeepSpeedEngine:
        raise ValueError(
            f"unsupported DeepSpeed engine {type(engine).__name__} (pipeline/hybrid engines)"
        )
    use_safe_loads(engine)
    return engine
