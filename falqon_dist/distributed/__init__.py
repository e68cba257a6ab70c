"""Distributed glue: DeepSpeed ZeRO 0–3 around FALQON models.

``initialize(model, ds_config)`` returns DeepSpeed's engine; :class:`ProxyMergeHook` is FALQON's
post-optimizer hook, which merges the proxies consistently on every rank (sharded under ZeRO-3)
through the one model-level merge, :func:`~falqon_dist.distributed.merge.merge_model_`. The method
package never imports this one.
"""

from falqon_dist.distributed.config import DeepSpeedConfigError, build_ds_config, prepare_ds_config
from falqon_dist.distributed.engine import initialize
from falqon_dist.distributed.merge import merge_model_
from falqon_dist.distributed.merge_hook import ProxyMergeHook
from falqon_dist.distributed.proxies import ProxyMasters

__all__ = [
    "DeepSpeedConfigError",
    "ProxyMasters",
    "ProxyMergeHook",
    "build_ds_config",
    "initialize",
    "merge_model_",
    "prepare_ds_config",
]
