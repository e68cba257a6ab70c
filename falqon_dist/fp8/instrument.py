"""Counting the dynamic FP8 casts a step makes — for benchmarks and tests, not for training.

Every dynamic cast of the FP8 layers (FALQON, FP8 LoRA) goes through a backend's ``quantize``, so
patching that method on the backend classes sees all of them, whatever the backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from falqon_dist.fp8.backends import _TorchCast
from falqon_dist.fp8.te_backend import TEBackend


@contextlib.contextmanager
def count_casts() -> Iterator[list[torch.dtype]]:
    """Within the context, append the FP8 format of every backend ``quantize`` call to the yielded list."""
    calls: list[torch.dtype] = []
    originals = [(cls, cls.quantize) for cls in (_TorchCast, TEBackend)]

    def counting(original):
        def quantize(self, x_hp, fp8_dtype, *, transpose=False):
            calls.append(fp8_dtype)
            return original(self, x_hp, fp8_dtype, transpose=transpose)

        return quantize

    for cls, original in originals:
        cls.quantize = counting(original)
    try:
        yield calls
    finally:
        for cls, original in originals:
            cls.quantize = original
