"""Model conversion: swap eligible ``nn.Linear`` modules for FALQON layers, and merge them all."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from falqon_dist.method.config import FalqonConfig
from falqon_dist.method.linear import FalqonLinear
from falqon_dist.method.merge_math import MergeStats
from falqon_dist.method.swap import ModuleFilter, default_filter, swap_linears, target_module_names

LayerBuilder = Callable[[nn.Linear, FalqonConfig], nn.Module]

__all__ = [
    "LayerBuilder",
    "ModuleFilter",
    "check_convertible",
    "convert_model",
    "default_filter",
    "falqon_layers",
    "merge_proxies_",
    "register_saver",
    "route_save_pretrained",
]


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
    conversion the proxies ``B`` are the model's only trainable parameters, and
    ``model.save_pretrained(dir)`` writes the FP8 export instead of transformers' files
    (:func:`route_save_pretrained`). Returns the converted module names.
    """
    # no half-converted model
    targets = check_convertible(model, config, module_filter_fn=module_filter_fn)
    index = {name: i for i, name in enumerate(targets)}

    def build(name: str, linear: nn.Linear) -> nn.Module:
        # a distinct, reproducible seed per layer: random inits must not repeat across layers
        return layer_builder(linear, dataclasses.replace(config, seed=config.seed + index[name]))

    converted = swap_linears(model, build, targets, device=device)
    route_save_pretrained(model)
    return converted


#: What ``model.save_pretrained(save_directory, **kwargs)`` of a converted model calls:
#: ``saver(model, save_directory, **kwargs)``. The export package registers its FP8 export here when
#: it is imported (:mod:`falqon_dist.export.save_pretrained`; ``import falqon_dist`` does), so the
#: method never imports the format that lies above it.
_saver: Callable[..., Any] | None = None


def register_saver(saver: Callable[..., Any]) -> None:
    """Make ``saver(model, save_directory, **kwargs)`` what a converted model's ``save_pretrained`` runs."""
    global _saver
    _saver = saver


def route_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained(dir, ...)`` run the registered saver (:func:`register_saver`).

    A converted model's ``Linear`` layers are FalqonLinear modules whose state is FP8 bytes and B:
    transformers' own ``save_pretrained`` would write them under names ``from_pretrained`` does not
    know, and the reloaded model would get every linear randomly initialized, without an error. The
    saver the export registers writes the FP8 export instead, which loads back with the trained
    weights. Set as an instance attribute, so neither the class nor transformers is patched.
    """
    if callable(getattr(model, "save_pretrained", None)):
        # a bound method (not a closure): a deepcopy or pickle of the model rebinds it to the copy
        model.save_pretrained = types.MethodType(_save_converted, model)  # type: ignore[assignment]


def _save_converted(model: nn.Module, save_directory, **kwargs):
    """``save_pretrained`` of a converted model: the registered saver, never transformers' own."""
    if _saver is None:
        raise RuntimeError(
            "save_pretrained of a FALQON-converted model writes the FP8 export, which registers itself when "
            "falqon_dist.export is imported: import falqon_dist.export (or call falqon_dist.export.export_fp8)"
        )
    return _saver(model, save_directory, **kwargs)


def check_convertible(
    model: nn.Module, config: FalqonConfig, *, module_filter_fn: ModuleFilter | None = None
) -> list[str]:
    """The names :func:`convert_model` would convert; :class:`~falqon_dist.config_checks.InvalidField`
    (``field`` ``"rank"`` or ``"topk"``) naming the first layer that ``config`` does not fit
    (:meth:`FalqonConfig.check_layer`). Reads only shapes: works on a model built on the meta
    device, so a run can be checked before any weight is loaded."""
    targets = target_module_names(model, module_filter_fn)
    for name in targets:
        # target_module_names names nn.Linear modules only
        linear = cast(nn.Linear, model.get_submodule(name))
        config.check_layer(linear.in_features, linear.out_features, name)
    return targets


def falqon_layers(model: nn.Module) -> list[tuple[str, FalqonLinear]]:
    """``(name, layer)`` for every FALQON layer of ``model``, in module order."""
    return [
        (name, module) for name, module in model.named_modules() if isinstance(module, FalqonLinear)
    ]


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
