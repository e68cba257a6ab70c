"""Model conversion: swap eligible ``nn.Linear`` modules for FALQON layers, and merge them all."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

import torch
from torch import nn

from falqon_dist.method.config import FalqonConfig
from falqon_dist.method.linear import FalqonLinear
from falqon_dist.method.merge_math import MergeStats
from falqon_dist.method.swap import ModuleFilter, default_filter, swap_linears, target_module_names

LayerBuilder = Callable[[nn.Linear, FalqonConfig], nn.Module]

__all__ = ["LayerBuilder", "ModuleFilter", "check_convertible", "convert_model", "default_filter", "falqon_layers",
           "merge_proxies_", "route_save_pretrained"]


def convert_model(
    model: nn.Module,
    config: FalqonConfig,
    *,
    module_filter_fn: ModuleFilter | None = None,
    layer_builder: LayerBuilder = FalqonLinear.from_linear,
    device: torch.device | str | None = None,
) -> list[str]:
    """Replace eligible linears of ``model`` in place with :class:`FalqonLinear`; freeze the rest.

    Layers are converted one at a time and each original is released as soon as its replacement is
    in place, so at most one extra layer's worth of memory is live. ``module_filter_fn(module, fqn)``
    replaces :func:`default_filter` (only ``nn.Linear`` modules are ever converted). ``layer_builder``
    builds each replacement; the distributed glue passes one that gathers a ZeRO-3 partitioned linear
    first and partitions the new layer after. ``device`` moves each original linear there just
    before its replacement is built (so the replacement lives there too): with the model loaded on
    the CPU and the rank's GPU given, the SVD init runs on the GPU one layer at a time. After
    conversion the proxies ``B`` are the model's only trainable parameters. Returns the converted
    module names.
    """
    targets = check_convertible(model, config, module_filter_fn=module_filter_fn)  # no half-converted model
    index = {name: i for i, name in enumerate(targets)}

    def build(name: str, linear: nn.Linear) -> nn.Module:
        # a distinct, reproducible seed per layer: random inits must not repeat across layers
        return layer_builder(linear, dataclasses.replace(config, seed=config.seed + index[name]))

    converted = swap_linears(model, build, targets, device=device)
    route_save_pretrained(model)
    return converted


#: ``save_pretrained`` keywords the FP8 export honours or can ignore (Trainer passes them).
_SAVE_KWARGS_IGNORED = ("state_dict", "safe_serialization", "is_main_process", "save_function", "push_to_hub")


def route_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained(dir)`` write the FP8 export (:func:`falqon_dist.export_fp8`).

    A converted model's ``Linear`` layers are FalqonLinear modules whose state is FP8 bytes and B:
    transformers' own ``save_pretrained`` would write them under names ``from_pretrained`` does not
    know, and the reloaded model would get every linear randomly initialized, without an error.
    The export instead loads back with transformers (compressed-tensors) with the trained weights.
    Set as an instance attribute, so neither the class nor transformers is patched. Under ZeRO-3
    the export gathers collectively on every rank, which ``save_pretrained`` callers (the HF
    Trainer saves on rank 0 only) do not do: it raises there, naming what to call instead.
    """
    if callable(getattr(model, "save_pretrained", None)):
        # a bound method (not a closure): a deepcopy or pickle of the model rebinds it to the copy
        model.save_pretrained = types.MethodType(_save_pretrained_fp8, model)


def _save_pretrained_fp8(model: nn.Module, save_directory, *, max_shard_size: int | str = "2GB", **kwargs):
    """Write the FP8 export of this FALQON model to ``save_directory`` (see ``export_fp8``)."""
    from falqon_dist.export import export_fp8  # the export package owns the checkpoint format

    unknown = sorted(set(kwargs) - set(_SAVE_KWARGS_IGNORED))
    if unknown or kwargs.get("safe_serialization", True) is False or kwargs.get("push_to_hub"):
        raise TypeError(
            f"save_pretrained of a FALQON-converted model writes the FP8 export (falqon_dist.export_fp8: "
            f"safetensors, compressed-tensors format) and takes save_directory and max_shard_size; got "
            f"{unknown or ['safe_serialization=False' if kwargs.get('safe_serialization') is False else 'push_to_hub']}"
        )
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3 partitioned (DeepSpeed's mark)
        raise RuntimeError(
            "save_pretrained cannot write a ZeRO-3 partitioned FALQON model from one rank: call "
            "falqon_dist.export_fp8(model, out_dir) on every rank (falqon_dist.integrations.FalqonCallback "
            "does it at the end of training; set TrainingArguments(save_strategy='no') or "
            "stage3_gather_16bit_weights_on_model_save=false for the Trainer's own saves)"
        )
    if kwargs.get("is_main_process", True) is False:
        return None
    return export_fp8(model, save_directory, max_shard_size=max_shard_size, overwrite=True)


def check_convertible(model: nn.Module, config: FalqonConfig, *, module_filter_fn: ModuleFilter | None = None) -> list[str]:
    """The names :func:`convert_model` would convert; ``ValueError`` naming the first layer that
    ``config`` does not fit (rank or topk too large). Reads only shapes: works on a model built on
    the meta device, so a run can be checked before any weight is loaded."""
    targets = target_module_names(model, module_filter_fn)
    for name in targets:
        _check_compatible(name, model.get_submodule(name), config)
    return targets


def _check_compatible(name: str, linear: nn.Linear, config: FalqonConfig) -> None:
    if config.rank > min(linear.in_features, linear.out_features):
        raise ValueError(
            f"cannot convert {name!r} ({linear.in_features}→{linear.out_features}): rank {config.rank} "
            f"exceeds min(in_features, out_features); lower the rank or exclude the layer with a filter"
        )
    if isinstance(config.topk, int) and config.topk > linear.out_features:
        raise ValueError(
            f"cannot convert {name!r}: topk {config.topk} exceeds its out_features {linear.out_features}; "
            f"use topk=None (= rank), 'all' or at most the smallest out_features of the converted layers"
        )


def falqon_layers(model: nn.Module) -> list[tuple[str, FalqonLinear]]:
    """``(name, layer)`` for every FALQON layer of ``model``, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, FalqonLinear)]


@torch.no_grad()
def merge_proxies_(model: nn.Module, *, step: int = 0) -> MergeStats:
    """Apply the proxy merge to every FALQON layer (call it right after each optimizer step).

    ``step`` — the optimizer step — keys stochastic merge rounding (pass it when
    ``merge_rounding="stochastic"``, or every merge draws the same noise). Issues no host
    synchronization; returns totals over layers as device tensors (``.to_dict()`` reads them:
    ``rows_merged``, ``saturated``, ``nonfinite``, ``layers``). Layers with ``merge_every > 1``
    merge only after every ``merge_every``-th step (``layers`` counts those that did).
    """
    totals = MergeStats()
    for _, layer in falqon_layers(model):
        if layer.merge_due(step):
            totals.add_(layer.merge_proxy_(step=step))
    return totals
