"""bf16 LoRA through peft's public API — the baseline most users would pick instead of FALQON.

Each targeted linear becomes ``y = x Wᵀ + (α/r) · dropout(x) Aᵀ Bᵀ`` with ``W`` frozen in the model's
dtype (bf16 for a bf16 model), ``A ∈ R^{r×in}`` (kaiming-uniform) and ``B ∈ R^{out×r}`` (zeros)
trainable, created by peft in the dtype of ``W``.

Why :func:`peft.inject_adapter_in_model` rather than :func:`peft.get_peft_model`: it mutates the
model in place and returns *the same object*, still a ``transformers`` model. So

* the trainer keeps one reference and one code path for every method (FALQON and FP8 LoRA convert
  in place too), and ``model(input_ids=..., labels=...)`` is the model's own forward;
* ``deepspeed.initialize(model=...)`` wraps a plain ``nn.Module`` whose only trainable parameters are
  the adapters (``*.lora_A.default.weight`` / ``*.lora_B.default.weight``), with no ``PeftModel``
  indirection in parameter names beyond peft's own ``base_layer`` / ``lora_*`` submodules;
* adapters keep the backbone's dtype (``get_peft_model`` would up-cast them to float32 by default);
  under DeepSpeed bf16 the optimizer keeps their fp32 master copy anyway.

What is given up: ``PeftModel`` conveniences (``save_pretrained`` of the adapter alone,
``merge_and_unload``); peft's :func:`peft.get_peft_model_state_dict` still extracts the adapter
weights from the injected model. With reentrant gradient checkpointing and frozen embeddings the
trainer must call ``model.enable_input_require_grads()`` (true of every adapter method here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from falqon_dist.baselines.config import LoraConfig
from falqon_dist.method.swap import ModuleFilter, target_module_names


def lora_targets(
    model: nn.Module,
    module_filter_fn: ModuleFilter | None,
    target_modules: Sequence[str] | None,
    caller: str,
) -> list[str]:
    """The names an adapter method targets: ``target_modules`` as given, else the linears
    ``module_filter_fn`` accepts (default: FALQON's layers,
    :func:`~falqon_dist.method.swap.target_module_names`). ``ValueError`` (prefixed with ``caller``)
    when both are given or when nothing is left."""
    if target_modules is not None and module_filter_fn is not None:
        raise ValueError(f"{caller}: pass module_filter_fn or target_modules, not both")
    names = (
        list(target_modules)
        if target_modules is not None
        else target_module_names(model, module_filter_fn)
    )
    if not names:
        raise ValueError(
            f"{caller}: no target modules (no eligible nn.Linear found and none given)"
        )
    return names


def inject_lora(model: nn.Module, config: LoraConfig, names: Sequence[str]) -> None:
    """peft LoRA adapters on the modules ``names`` of ``model``, in place (``alpha`` None = rank)."""
    from peft import LoraConfig as PeftLoraConfig  # heavy import, only when LoRA is used
    from peft import inject_adapter_in_model

    peft_config = PeftLoraConfig(
        r=config.rank,
        # peft annotates an int; it scales by lora_alpha / r in floating point either way
        lora_alpha=float(config.rank if config.alpha is None else config.alpha),  # type: ignore[arg-type]
        lora_dropout=config.dropout,
        target_modules=list(names),
        bias="none",
    )
    inject_adapter_in_model(peft_config, model)


def apply_lora(
    model: nn.Module,
    config: LoraConfig,
    *,
    device: torch.device | str | None = None,
    module_filter_fn: ModuleFilter | None = None,
    target_modules: Sequence[str] | None = None,
) -> list[str]:
    """Inject LoRA adapters into ``model`` in place (see module docstring); return the adapted names.

    ``config.alpha`` None means ``rank`` (scaling α/r = 1, the same footing as FALQON, which has no
    scaling). The layers are the linears ``module_filter_fn(module, fqn)`` accepts (default:
    :func:`~falqon_dist.method.swap.target_module_names`, FALQON's layers), or exactly the fully
    qualified names ``target_modules``. ``device`` is part of every method's signature
    (:func:`falqon_dist.methods.prepare_model`); peft builds each adapter where its layer is, so it is
    not used. Afterwards only the adapter weights are trainable.
    """
    names = lora_targets(model, module_filter_fn, target_modules, "apply_lora")
    inject_lora(model, config, names)
    return names
