"""Distributed glue: DeepSpeed ZeRO 0–3 around FALQON models.

``initialize(model, ds_config)`` returns a DeepSpeed engine whose ``step()`` merges the proxies
consistently on every rank (sharded under ZeRO-3). The method package never imports this one.
"""

from falqon_dist.distributed.config import DeepSpeedConfigError, prepare_ds_config
from falqon_dist.distributed.engine import FalqonEngine, initialize

__all__ = ["DeepSpeedConfigError", "FalqonEngine", "initialize", "prepare_ds_config"]
