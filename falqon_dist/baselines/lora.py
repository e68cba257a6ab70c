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

from torch import nn

from falqon_dist.method.swap import target_module_names


def check_lora_args(rank: int, dropout: float, caller: str) -> None:
    """Raise ``ValueError`` (prefixed with ``caller``) for a rank that is not a positive integer or a
    dropout outside [0, 1)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{caller}: rank must be a positive integer, got {rank!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{caller}: dropout must be in [0, 1), got {dropout!r}")


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and return it (see module docstring).

    ``alpha`` defaults to ``rank`` (scaling α/r = 1, the same footing as FALQON, which has no
    scaling). ``target_modules`` are fully qualified module names; the default is
    :func:`~falqon_dist.method.swap.target_module_names` (FALQON's layers). Afterwards only the
    adapter weights are trainable.
    """
    check_lora_args(rank, dropout, "apply_lora")
    names = list(target_modules) if target_modules is not None else target_module_names(model)
    if not names:
        raise ValueError("apply_lora: no target modules (no eligible nn.Linear found and none given)")
    from peft import LoraConfig, inject_adapter_in_model  # heavy import, only when LoRA is used

    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        lora_dropout=dropout,
        target_modules=names,
        bias="none",
    )
    return inject_adapter_in_model(config, model)
