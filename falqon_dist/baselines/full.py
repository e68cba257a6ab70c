"""Full fine-tuning: every parameter trainable — the quality ceiling and the memory ceiling.

What DeepSpeed holds for a model of P parameters trained in bf16 with Adam (ZeRO divides the
sharded parts by the data-parallel world size N): bf16 weights 2P bytes (sharded at stage 3),
bf16 gradients 2P (sharded at stage ≥ 2), fp32 master weights 4P and Adam's two fp32 moments 8P
(sharded at stage ≥ 1) — 16P bytes in all, against about 2P (bf16 LoRA) or 1P (FP8 backbones) plus
a small adapter for the adapter methods, whose optimizer state covers only the adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from falqon_dist.baselines.config import FullConfig
from falqon_dist.method.swap import ModuleFilter


def prepare_full_finetune(
    model: nn.Module,
    config: FullConfig | None = None,
    *,
    device: torch.device | str | None = None,
    module_filter_fn: ModuleFilter | None = None,
) -> list[str]:
    """Unfreeze every parameter of ``model`` in place; return their names (see module docstring).

    ``config`` (:class:`FullConfig`, nothing to set), ``device`` and ``module_filter_fn`` are every
    method's signature (:func:`falqon_dist.methods.prepare_model`): full fine-tuning trains every
    parameter where it is, so the layer choice and the device are not used. Integer / FP8-bit
    parameters cannot require gradients and are reported as an error, since they mean the model was
    already converted by an FP8 method.
    """
    names = []
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            raise ValueError(
                f"prepare_full_finetune: parameter {name!r} has dtype {param.dtype} and cannot be trained; "
                "full fine-tuning needs an unconverted model"
            )
        param.requires_grad_(True)
        names.append(name)
    return names
