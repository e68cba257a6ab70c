"""One entry point that prepares a model for any fine-tuning method the trainer supports."""

from __future__ import annotations

import torch
from torch import nn

from falqon_dist.baselines.fp8_lora import convert_fp8_lora
from falqon_dist.baselines.full import prepare_full_finetune
from falqon_dist.baselines.lora import apply_lora
from falqon_dist.baselines.qlora import apply_qlora
from falqon_dist.method import FalqonConfig, convert_model
from falqon_dist.method.swap import ModuleFilter, target_module_names

#: Method names accepted by :func:`prepare_model`.
METHODS = ("falqon", "lora", "fp8_lora", "full", "qlora")


def prepare_model(
    model: nn.Module,
    method: str,
    *,
    rank: int,
    topk: int | str | None = None,
    alpha: float | None = None,
    dropout: float = 0.0,
    backend: str = "auto",
    init: str = "svd",
    double_quant: bool = True,
    cache_weight_transpose: bool = False,
    merge_rounding: str = "nearest",
    unmerged: str = "keep",
    carry_residual: bool = False,
    scale_headroom: int = 1,
    device: torch.device | str | None = None,
    module_filter_fn: ModuleFilter | None = None,
) -> list[str]:
    """Apply ``method`` to ``model`` in place and return what it targeted.

    * ``falqon`` — :func:`falqon_dist.convert_model` with ``FalqonConfig(rank, topk, init, backend,
      cache_weight_transpose, merge_rounding, unmerged, carry_residual, scale_headroom)``; returns the converted module names. ``alpha`` does not apply (B is
      in real units).
    * ``lora`` — bf16 LoRA via peft (:func:`~falqon_dist.baselines.lora.apply_lora`, ``rank``,
      ``alpha``, ``dropout``); returns the adapted module names. ``alpha`` defaults to ``rank``.
    * ``fp8_lora`` — :func:`~falqon_dist.baselines.fp8_lora.convert_fp8_lora` (``rank``, ``alpha``,
      ``backend``); returns the converted module names.
    * ``full`` — :func:`~falqon_dist.baselines.full.prepare_full_finetune`; returns the names of all
      *parameters* (nothing is converted).
    * ``qlora`` — NF4 backbone (bitsandbytes) + peft LoRA
      (:func:`~falqon_dist.baselines.qlora.apply_qlora`, ``rank``, ``alpha``, ``dropout``,
      ``double_quant``; compute dtype = the model's; quantized on ``device``, default where each
      weight is); returns the adapted module names. Needs
      bitsandbytes (``ImportError`` with the install command otherwise).

    ``module_filter_fn(module, fqn)`` chooses the layers (falqon, lora, fp8_lora, qlora; default
    :func:`~falqon_dist.method.swap.default_filter`, e.g. :func:`~falqon_dist.method.swap.module_filter`
    for names / regexes), the same for every method.

    ``device`` (falqon, fp8_lora, qlora): build each converted layer there, one at a time — pass the
    rank's GPU when the model was loaded on the CPU, so the SVD init / quantization runs on the GPU
    (default: where each weight already is).

    Options a method does not use (``topk``/``init`` outside FALQON, ``dropout`` outside the peft
    methods, ``double_quant`` outside QLoRA, ``cache_weight_transpose`` / ``merge_rounding`` / ``unmerged`` / ``carry_residual`` / ``scale_headroom`` outside FALQON, ``rank`` for
    ``full``) are
    ignored, so one config can drive every method. Afterwards exactly the method's parameters have
    ``requires_grad``. Raises ``ValueError`` for an unknown ``method``.
    """
    if method == "falqon":
        config = FalqonConfig(
            rank=rank,
            topk=topk,
            init=init,
            backend=backend,
            cache_weight_transpose=cache_weight_transpose,
            merge_rounding=merge_rounding,
            unmerged=unmerged,
            carry_residual=carry_residual,
            scale_headroom=scale_headroom,
        )
        return convert_model(model, config, device=device, module_filter_fn=module_filter_fn)
    if method == "lora":
        names = target_module_names(model, module_filter_fn)
        apply_lora(model, rank=rank, alpha=alpha, dropout=dropout, target_modules=names)
        return names
    if method == "fp8_lora":
        return convert_fp8_lora(model, rank=rank, alpha=alpha, backend=backend, device=device,
                                module_filter_fn=module_filter_fn)  # fmt: skip
    if method == "full":
        return prepare_full_finetune(model)
    if method == "qlora":
        return apply_qlora(model, rank=rank, alpha=alpha, dropout=dropout, double_quant=double_quant, device=device,
                           target_modules=target_module_names(model, module_filter_fn))  # fmt: skip
    raise ValueError(f"unknown fine-tuning method {method!r}; valid: {METHODS}")
