"""The one module-swap primitive: replace chosen ``nn.Linear`` layers of a model, one at a time.

Every method that adapts a model in place (FALQON's :func:`~falqon_dist.method.convert_model`, the
FP8-LoRA and QLoRA baselines) goes through :func:`swap_linears`, so they all adapt the same layers
(:func:`default_filter` unless told otherwise), freeze the same way, and never hold more than one
extra layer in memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

ModuleFilter = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Every ``nn.Linear`` except the LM head whose dimensions are both multiples of 16."""
    return (
        isinstance(module, nn.Linear)
        and fqn.split(".")[-1] != "lm_head"
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def target_module_names(
    model: nn.Module, module_filter_fn: ModuleFilter | None = None
) -> list[str]:
    """Fully qualified names of the ``nn.Linear`` modules ``module_filter_fn(module, fqn)`` accepts
    (default :func:`default_filter`), in module order."""
    accept = module_filter_fn or default_filter
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and accept(module, name)
    ]


def matches(pattern: str, fqn: str) -> bool:
    r"""Whether a target pattern names module ``fqn``: the full name, a dotted suffix of it
    (``q_proj``, ``self_attn.q_proj``), or a regular expression matching the full name
    (``model\.layers\.[0-3]\..*``)."""
    if fqn == pattern or fqn.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, fqn) is not None
    except re.error:
        return False


def module_filter(
    target_modules: Sequence[str] | None = None, exclude_modules: Sequence[str] | None = None
) -> ModuleFilter:
    """The linears named by ``target_modules`` (default: :func:`default_filter`'s) minus those named
    by ``exclude_modules`` (patterns as in :func:`matches`)."""

    def accept(module: nn.Module, fqn: str) -> bool:
        if target_modules is None:
            chosen = default_filter(module, fqn)
        else:
            chosen = isinstance(module, nn.Linear) and any(matches(p, fqn) for p in target_modules)
        return chosen and not any(matches(p, fqn) for p in exclude_modules or ())

    return accept


def select_modules(
    model: nn.Module,
    target_modules: Sequence[str] | None = None,
    exclude_modules: Sequence[str] | None = None,
) -> ModuleFilter:
    """:func:`module_filter`, checked against ``model`` first: every pattern must name at least one
    ``nn.Linear``, else ``ValueError`` lists the linear layers there are, and something must be
    left to adapt. Works on a model built on the meta device, so a run's choice is checked before
    any weight is loaded."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for key, patterns in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        for pattern in patterns or ():
            if not any(matches(pattern, name) for name in linears):
                kinds = sorted({name.rsplit(".", 1)[-1] for name in linears})
                raise ValueError(
                    f"{key}: {pattern!r} names no nn.Linear of the model; its linear layers are "
                    f"{', '.join(kinds)} (e.g. {linears[0]!r}), by name suffix or regex"
                )

    accept = module_filter(target_modules, exclude_modules)
    if not target_module_names(model, accept):
        raise ValueError("target_modules / exclude_modules leave no layer to adapt")
    return accept


def swap_linears(
    model: nn.Module,
    build: Callable[[str, nn.Linear], nn.Module],
    names: Sequence[str],
    *,
    device: torch.device | str | None = None,
) -> list[str]:
    """Freeze every parameter of ``model``, then replace each linear in ``names`` by
    ``build(name, linear)``, in order, releasing each original as soon as its replacement is in
    place. ``device`` moves each original there just before ``build`` sees it (so an SVD or a
    quantization runs on the GPU one layer at a time while the model waits on the CPU). The caller
    checks ``names`` first, so a bad target leaves the model untouched. Returns ``names``.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child_name)
        if device is not None:
            linear.to(device)
        setattr(parent, child_name, build(name, linear))
        del linear
    return list(names)
