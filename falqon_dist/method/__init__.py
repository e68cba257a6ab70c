"""The FALQON method: the melded FP8 layer, its initialization, the proxy merge, model conversion.

Knows nothing of distribution: the distributed glue calls ``FalqonLinear.merge_proxy_`` /
``proxy.merge_slice_`` with whatever B copy and weight slice it owns.
"""

from falqon_dist.method.config import FalqonConfig
from falqon_dist.method.convert import convert_model, default_filter, falqon_layers, merge_proxies_
from falqon_dist.method.linear import FalqonLinear

__all__ = [
    "FalqonConfig",
    "FalqonLinear",
    "convert_model",
    "default_filter",
    "falqon_layers",
    "merge_proxies_",
]
