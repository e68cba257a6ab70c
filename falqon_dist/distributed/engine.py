"""``initialize``: a DeepSpeed engine whose ``step()`` applies FALQON's proxy merges.

The merge is a post-optimizer hook (torchtitan's converter pattern): it must run right after the
optimizer update, exactly once per gradient-accumulation boundary, and never between micro-batches.
DeepSpeed has no public post-step hook, so the engine built by ``deepspeed.initialize`` is given a
subclass that only extends ``step()``: everything else, including the class's own state, is the
engine DeepSpeed built.
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.engine import DeepSpeedEngine
from torch import nn

from falqon_dist.distributed.config import prepare_ds_config
from falqon_dist.distributed.merge import fold_all, merge_all
from falqon_dist.method.merge_math import MergeStats
from falqon_dist.distributed.proxies import ProxyMasters
from falqon_dist.distributed.safe_load import use_safe_loads
from falqon_dist.method import falqon_layers


class FalqonEngine(DeepSpeedEngine):
    """A :class:`DeepSpeedEngine` that merges B into the FP8 backbone after each optimizer step.

    ``last_merge_stats`` holds the totals of the latest merge (``rows_merged``, ``saturated``,
    ``layers``), or ``None`` before the first one.
    """

    last_merge_stats: dict[str, int] | None
    _proxy_masters: ProxyMasters
    _has_falqon_layers: bool

    def adds_proxy_term(self) -> bool:
        """Whether any FALQON layer's forward adds B's term (the carry, unmerged rows, updates between
        merges): False for the paper's merge and for other methods, whose model is its export."""
        return any(layer.lora_terms[0] for _, layer in falqon_layers(self.module))

    def fold_carry(self) -> MergeStats | None:
        """Fold what B still holds into the FP8 bytes and zero B (:func:`~falqon_dist.distributed.merge.fold_all`),
        so that the model is the one its FP8 export holds; None (nothing to do) unless
        :meth:`adds_proxy_term`."""
        return fold_all(self.module, self._proxy_masters) if self.adds_proxy_term() else None

    def step(self, lr_kwargs=None):
        steps_before = self.global_steps
        super().step(lr_kwargs=lr_kwargs)
        if self.global_steps > steps_before and self._has_falqon_layers:
            self.last_merge_stats = merge_all(self.module, self._proxy_masters, self.global_steps)


def initialize(
    model: nn.Module,
    ds_config: dict[str, Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler=None,
    lr: float | None = None,
) -> FalqonEngine:
    """Wrap a converted model in DeepSpeed and return the engine.

    ``ds_config`` is validated (a bad value raises :class:`DeepSpeedConfigError` naming the key) and
    completed with what FALQON needs; only trainable parameters (the B proxies, for FALQON) are
    handed to the optimizer. ``lr`` overrides the optimizer's learning rate in the config.
    """
    config = prepare_ds_config(ds_config, on_cpu=get_accelerator().device_name() == "cpu", lr=lr)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: convert it (or unfreeze it) before initialize()")
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=config,
    )
    if type(engine) is not DeepSpeedEngine:
        raise ValueError(f"unsupported DeepSpeed engine {type(engine).__name__} (pipeline/hybrid engines)")
    engine.__class__ = FalqonEngine
    use_safe_loads(engine)  # engine.load_checkpoint reads with weights_only=True
    engine.last_merge_stats = None
    engine._proxy_masters = ProxyMasters(engine.optimizer)
    engine._has_falqon_layers = bool(falqon_layers(model))
    return engine
