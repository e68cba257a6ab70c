"""An endless, resumable stream of this rank's training batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from falqon_dist.data.collate import TrainBatchSampler


class BatchStream:
    """Yields collated batches epoch after epoch; ``state()`` / ``restore()`` give the position.

    The position is (epoch, batches consumed in that epoch): the sampler's order depends only on
    the seed and the epoch, so a resumed run sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, dataset, sampler: TrainBatchSampler, collate_fn: Callable) -> None:
        if len(sampler) == 0:
            raise ValueError(
                f"the training data gives no batch for this rank: {len(dataset)} examples are too few for "
                f"micro_batch_size={sampler.batch_size} on {sampler.num_replicas} ranks"
            )
        self.dataset, self.sampler, self.collate_fn = dataset, sampler, collate_fn
        self.epoch, self.offset = 0, 0
        self._iterator: Iterator[list[int]] | None = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._iterator = None

    def _start_epoch(self) -> Iterator[list[int]]:
        self.sampler.set_epoch(self.epoch)
        batches = list(self.sampler)
        return iter(batches[self.offset :])

    def next(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = self._start_epoch()
        indices = next(self._iterator, None)
        if indices is None:
            self.epoch, self.offset = self.epoch + 1, 0
            self._iterator = self._start_epoch()
            indices = next(self._iterator)
        self.offset += 1
        return self.collate_fn([self.dataset[i] for i in indices])
