"""What ZeRO-3 did to a parameter, asked in one place.

DeepSpeed marks a ZeRO-3 partitioned parameter with ``ds_id`` and keeps its full shape in
``ds_shape`` (``param.shape`` is then empty) and this rank's slice in ``ds_tensor``. Everything in
falqon_dist that must tell partitioned from whole parameters asks here, so a DeepSpeed change to
those attributes breaks one module (and ``tests/unit/test_deepspeed_internals.py``), not five.
"""

from __future__ import annotations

import torch
from torch import nn


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is ZeRO-3 partitioned (its data lives in slices across the ranks)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's logical shape, partitioned or not."""
    return param.ds_shape if is_partitioned(param) else param.shape


def has_partitions(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is ZeRO-3 partitioned (built under ``zero.Init``)."""
    return any(is_partitioned(p) for p in model.parameters())
