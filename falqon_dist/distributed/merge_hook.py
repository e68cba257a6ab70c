"""FALQON's post-optimizer hook: merge B into the FP8 backbone right after each optimizer step.

FALQON trains only the proxies B; after every optimizer update (once per gradient-accumulation
boundary, never between micro-batches) B is merged into the FP8 bytes of ``M_q`` and reset to what
the recipe keeps (torchtitan's converter pattern: a model conversion plus a post-optimizer hook).
Whoever owns the loop calls the hook visibly::

    hook = ProxyMergeHook(engine.module, engine.optimizer)   # or (model, torch_optimizer) without DeepSpeed
    ...
    steps = engine.global_steps
    engine.step()
    if engine.global_steps > steps:
        stats = hook(engine.global_steps)                    # MergeStats, device tensors: no host sync
    ...
    hook.fold()                                              # before an export: B's remainder into the bytes

The registry builds it for ``method=falqon`` (:func:`falqon_dist.methods.post_optimizer_hook`); the
trainer, ``FalqonCallback`` and ``benchmarks/bench_zero.py`` call it. It binds the optimizer's
full-precision masters of B once (:class:`~falqon_dist.distributed.proxies.ProxyMasters`: DeepSpeed's
fp32 copies under ZeRO 0–3 and bf16, the parameters themselves for a plain torch optimizer) and
merges through the one model-level merge, :func:`~falqon_dist.distributed.merge.merge_model_`.
"""

from __future__ import annotations

import torch
from torch import nn

from falqon_dist.distributed.merge import merge_model_
from falqon_dist.distributed.proxies import ProxyMasters
from falqon_dist.method import falqon_layers
from falqon_dist.method.merge_math import MergeStats


class ProxyMergeHook:
    """Merges every due FALQON layer of ``model`` after an optimizer step; folds B before an export.

    ``optimizer``: the one stepping B (DeepSpeed's ``engine.optimizer``, a plain torch optimizer, or
    None when the parameters are stepped in place). Raises ``ValueError`` for a model without
    FALQON layers.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self.layers = falqon_layers(model)
        if not self.layers:
            raise ValueError(
                "the model has no FalqonLinear layer: convert it (falqon_dist.convert_model) first"
            )
        self.masters = ProxyMasters(optimizer)

    def __call__(self, step: int) -> MergeStats:
        """Merge after optimizer step ``step`` (1, 2, …): every layer due (``merge_every``), the same
        bytes on every rank. The totals are device tensors; ``layers == 0`` when none was due."""
        return merge_model_(self.model, self.masters, step=step, layers=self.layers)

    @property
    def needs_fold(self) -> bool:
        """Whether any layer's forward adds B's term (the carry, rows no merge took yet, updates
        between merges): then the trained model is not yet what its FP8 export holds. False for the
        paper's merge, whose B is zero after every step."""
        return any(layer.lora_terms[0] for _, layer in self.layers)

    def fold(self) -> MergeStats | None:
        """Fold what B still holds into the FP8 bytes and zero B and its master (every row, nearest,
        nothing carried), so that the model computes exactly what its FP8 export holds; None
        (nothing done) unless :attr:`needs_fold`."""
        if not self.needs_fold:
            return None
        return merge_model_(self.model, self.masters, fold=True, layers=self.layers)
