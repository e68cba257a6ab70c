"""The training loop, evaluation, checkpoint/resume, metrics and W&B logging.

Knows nothing of FP8: the DeepSpeed engine from :mod:`falqon_dist.distributed` applies FALQON's merges.
"""

from falqon_dist.train.settings import ConfigError, RunSettings, validate
from falqon_dist.train.trainer import Trainer, run

__all__ = ["ConfigError", "RunSettings", "Trainer", "run", "validate"]
