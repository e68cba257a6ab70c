"""Every fine-tuning method behind one shape: a frozen config class, the function that applies it to a
model, and the post-optimizer hook it needs (FALQON's merge; none for the baselines).

    from falqon_dist.methods import METHODS, method_config, post_optimizer_hook, prepare_model
    config = method_config("lora", {"rank": 16, "dropout": 0.05})   # or LoraConfig(rank=16, ...)
    names = prepare_model(model, config, device="cuda")            # what it adapted
    engine = falqon_dist.distributed.initialize(model, ds_config)
    hook = post_optimizer_hook(config, engine.module, engine.optimizer)   # None for lora
    ...
    engine.step()                                                  # at an accumulation boundary:
    if hook is not None:
        stats = hook(engine.global_steps)                          # FALQON: B into the FP8 backbone

=========  ======================================  =====================================================
name       config                                  convert
=========  ======================================  =====================================================
falqon     :class:`~falqon_dist.method.FalqonConfig`  :func:`~falqon_dist.method.convert_model`, and the
                                                   hook :class:`~falqon_dist.distributed.ProxyMergeHook`
lora       :class:`~falqon_dist.baselines.config.LoraConfig`  :func:`~falqon_dist.baselines.apply_lora` (peft)
fp8_lora   :class:`~falqon_dist.baselines.config.Fp8LoraConfig`  :func:`~falqon_dist.baselines.convert_fp8_lora`
qlora      :class:`~falqon_dist.baselines.config.QloraConfig`  :func:`~falqon_dist.baselines.apply_qlora` (bitsandbytes)
full       :class:`~falqon_dist.baselines.config.FullConfig`  :func:`~falqon_dist.baselines.prepare_full_finetune`
=========  ======================================  =====================================================

Every convert function has the same signature, ``convert(model, config, *, device, module_filter_fn)
-> list[str]``. The layers are chosen the same way for every method but ``full``
(``module_filter_fn``; default: every eligible ``nn.Linear`` but ``lm_head``). This module sits above
``method/``, ``distributed/`` and ``baselines/``: none of them knows the others' configs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from falqon_dist.baselines import apply_lora, apply_qlora, convert_fp8_lora, prepare_full_finetune
from falqon_dist.baselines.config import Fp8LoraConfig, FullConfig, LoraConfig, QloraConfig
from falqon_dist.distributed.merge_hook import ProxyMergeHook
from falqon_dist.method import FalqonConfig, convert_model
from falqon_dist.method.merge_math import MergeStats
from falqon_dist.method.swap import ModuleFilter

MethodConfig = FalqonConfig | LoraConfig | Fp8LoraConfig | QloraConfig | FullConfig


class PostOptimizerHook(Protocol):
    """What a method runs right after each optimizer step (:class:`~falqon_dist.distributed.ProxyMergeHook`)."""

    def __call__(self, step: int) -> MergeStats: ...

    @property
    def needs_fold(self) -> bool: ...

    def fold(self) -> MergeStats | None: ...


class Method(NamedTuple):
    """A method's config class, ``convert(model, config, *, device, module_filter_fn) -> names``, and
    ``post_optimizer_hook(model, optimizer) -> hook`` (None: the optimizer step is all it needs)."""

    config: type
    convert: Callable[..., list[str]]
    post_optimizer_hook: Callable[[nn.Module, Any], PostOptimizerHook] | None = None


#: name -> (config class, convert, hook factory); the Hydra ``method=`` choices.
METHODS: dict[str, Method] = {
    "falqon": Method(FalqonConfig, convert_model, ProxyMergeHook),
    "lora": Method(LoraConfig, apply_lora),
    "fp8_lora": Method(Fp8LoraConfig, convert_fp8_lora),
    "qlora": Method(QloraConfig, apply_qlora),
    "full": Method(FullConfig, prepare_full_finetune),
}


def method_name(config: MethodConfig) -> str:
    """The registry name of ``config``'s method."""
    for name, method in METHODS.items():
        if type(config) is method.config:
            return name
    raise TypeError(
        f"not a method config: {type(config).__name__}; valid: {[m.config.__name__ for m in METHODS.values()]}"
    )


def config_fields(name: str) -> tuple[str, ...]:
    """The fields of method ``name``'s config class."""
    return tuple(f.name for f in dataclasses.fields(METHODS[name].config))


def method_config(name: str, fields: Mapping[str, Any]) -> MethodConfig:
    """Method ``name``'s config from ``fields`` (absent fields take the class defaults).

    Raises ``ValueError`` for an unknown name or field, and the config's own
    :class:`~falqon_dist.method.config.InvalidField` for a bad value."""
    if name not in METHODS:
        raise ValueError(f"unknown fine-tuning method {name!r}; valid: {tuple(METHODS)}")
    unknown = sorted(set(fields) - set(config_fields(name)))
    if unknown:
        raise ValueError(
            f"{METHODS[name].config.__name__} has no field {unknown[0]!r}; its fields: {config_fields(name)}"
        )
    return METHODS[name].config(**fields)


def prepare_model(
    model: nn.Module,
    config: MethodConfig,
    *,
    device: torch.device | str | None = None,
    module_filter_fn: ModuleFilter | None = None,
) -> list[str]:
    """Apply ``config``'s method to ``model`` in place and return what it targeted: the converted or
    adapted module names (all parameter names for ``full``).

    ``device``: build each converted layer there, one at a time (FALQON's SVD init, FP8 / NF4
    quantization on the rank's GPU while the model was loaded on the CPU); default where each weight
    is. ``module_filter_fn(module, fqn)`` chooses the layers (e.g.
    :func:`~falqon_dist.method.swap.module_filter` for names / regexes). Afterwards exactly the
    method's parameters have ``requires_grad``.
    """
    return METHODS[method_name(config)].convert(
        model, config, device=device, module_filter_fn=module_filter_fn
    )


def post_optimizer_hook(
    config: MethodConfig, model: nn.Module, optimizer: Any
) -> PostOptimizerHook | None:
    """The hook ``config``'s method runs after each optimizer step on ``model`` (prepared by
    :func:`prepare_model`; a DeepSpeed engine's ``engine.module``), bound to ``optimizer`` (the
    engine's, or a plain torch one): FALQON's :class:`~falqon_dist.distributed.ProxyMergeHook`, or
    None for a method without one."""
    factory = METHODS[method_name(config)].post_optimizer_hook
    return None if factory is None else factory(model, optimizer)
