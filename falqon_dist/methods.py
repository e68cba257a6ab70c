"""Every fine-tuning method behind one shape: a frozen config class and the function that applies it.

    from falqon_dist.methods import METHODS, method_config, prepare_model
    config = method_config("lora", {"rank": 16, "dropout": 0.05})   # or LoraConfig(rank=16, ...)
    names = prepare_model(model, config, device="cuda")            # what it adapted

=========  ======================================  =====================================================
name       config                                  apply
=========  ======================================  =====================================================
falqon     :class:`~falqon_dist.method.FalqonConfig`  :func:`~falqon_dist.method.convert_model`
lora       :class:`~falqon_dist.baselines.config.LoraConfig`  :func:`~falqon_dist.baselines.apply_lora` (peft)
fp8_lora   :class:`~falqon_dist.baselines.config.Fp8LoraConfig`  :func:`~falqon_dist.baselines.convert_fp8_lora`
qlora      :class:`~falqon_dist.baselines.config.QloraConfig`  :func:`~falqon_dist.baselines.apply_qlora` (bitsandbytes)
full       :class:`~falqon_dist.baselines.config.FullConfig`  :func:`~falqon_dist.baselines.prepare_full_finetune`
=========  ======================================  =====================================================

The layers are chosen the same way for every method but ``full`` (``module_filter_fn``; default:
every eligible ``nn.Linear`` but ``lm_head``). This module sits above ``method/`` and
``baselines/``: neither knows the other's configs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from falqon_dist.baselines import apply_lora, apply_qlora, convert_fp8_lora, prepare_full_finetune
from falqon_dist.baselines.config import Fp8LoraConfig, FullConfig, LoraConfig, QloraConfig
from falqon_dist.method import FalqonConfig, convert_model
from falqon_dist.method.swap import ModuleFilter, target_module_names

MethodConfig = FalqonConfig | LoraConfig | Fp8LoraConfig | QloraConfig | FullConfig


class Method(NamedTuple):
    """A method's config class and ``apply(model, config, device=, module_filter_fn=) -> names``."""

    config: type
    apply: Callable[..., list[str]]


def _falqon(model, config: FalqonConfig, *, device, module_filter_fn) -> list[str]:
    return convert_model(model, config, device=device, module_filter_fn=module_filter_fn)


def _lora(model, config: LoraConfig, *, device, module_filter_fn) -> list[str]:
    names = target_module_names(model, module_filter_fn)
    apply_lora(model, rank=config.rank, alpha=config.alpha, dropout=config.dropout, target_modules=names)
    return names


def _fp8_lora(model, config: Fp8LoraConfig, *, device, module_filter_fn) -> list[str]:
    return convert_fp8_lora(model, rank=config.rank, alpha=config.alpha, backend=config.backend, device=device,
                            module_filter_fn=module_filter_fn)  # fmt: skip


def _qlora(model, config: QloraConfig, *, device, module_filter_fn) -> list[str]:
    return apply_qlora(model, rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                       double_quant=config.double_quant, device=device,
                       target_modules=target_module_names(model, module_filter_fn))  # fmt: skip


def _full(model, config: FullConfig, *, device, module_filter_fn) -> list[str]:
    return prepare_full_finetune(model)


#: name -> (config class, apply); the Hydra ``method=`` choices.
METHODS: dict[str, Method] = {
    "falqon": Method(FalqonConfig, _falqon),
    "lora": Method(LoraConfig, _lora),
    "fp8_lora": Method(Fp8LoraConfig, _fp8_lora),
    "qlora": Method(QloraConfig, _qlora),
    "full": Method(FullConfig, _full),
}


def method_name(config: MethodConfig) -> str:
    """The registry name of ``config``'s method."""
    for name, method in METHODS.items():
        if type(config) is method.config:
            return name
    raise TypeError(f"not a method config: {type(config).__name__}; valid: {[m.config.__name__ for m in METHODS.values()]}")


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
        raise ValueError(f"{METHODS[name].config.__name__} has no field {unknown[0]!r}; its fields: {config_fields(name)}")
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
    return METHODS[method_name(config)].apply(model, config, device=device, module_filter_fn=module_filter_fn)
