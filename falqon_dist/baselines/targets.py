"""Which linear layers a baseline adapts: by default exactly the ones FALQON converts."""

from __future__ import annotations

from torch import nn

from falqon_dist.method import default_filter
from falqon_dist.method.convert import ModuleFilter


def target_module_names(model: nn.Module, module_filter_fn: ModuleFilter | None = None) -> list[str]:
    """Fully qualified names of the ``nn.Linear`` modules a method adapts, in module order.

    The default filter is FALQON's (:func:`falqon_dist.method.default_filter`): every ``nn.Linear``
    except ``lm_head`` whose in and out features are multiples of 16, so all methods adapt the same
    layers and comparisons are like for like.
    """
    accept = module_filter_fn or default_filter
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and accept(module, name)]
