"""Module plumbing shared by every layer that stores FP8 weights with a float32 scale buffer."""

from __future__ import annotations

import torch
from torch import nn


class Float32ScaleMixin(nn.Module):
    """Keeps the ``scale`` buffer float32 through module-wide casts.

    ``.bfloat16()``, ``.half()`` and DeepSpeed's bf16 mode cast every floating buffer; an FP8 scale
    rounded to bf16 would silently change every dequantized weight. Device moves still apply.
    """

    scale: torch.Tensor

    def _apply(self, fn, recurse=True):
        scale = self.scale
        super()._apply(fn, recurse)
        if self.scale.dtype != torch.float32:
            self.scale = scale.to(device=self.scale.device)
        return self
