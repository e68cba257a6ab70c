"""Batching: packing into ``max_length`` rows, padding collate, and a length-grouped sampler.

**Packing.** :func:`pack_examples` concatenates whole tokenized examples (in order, greedily) into rows
of at most ``max_length`` tokens; an example never straddles two rows. Labels keep each example's
own prompt mask, and ``position_ids`` restart at 0 at every example boundary. A packed batch carries
``position_ids`` and **no** ``attention_mask``: transformers (≥ 4.5x) then recognises the restarts
and builds a block-diagonal causal mask, so every example attends only to itself — but only when the
model is called with ``use_cache=False`` (with a cache, or with an explicit ``attention_mask``, the
detection is skipped and attention spans the whole packed row, which still trains, with some
cross-example leakage). Models without that detection also attend across the row.

**Padding.** :class:`Collator` right-pads to the longest item of the batch with the pad id; padding
has label ``IGNORE_INDEX`` and, for unpacked batches, ``attention_mask`` 0.

**Batching.** :class:`TrainBatchSampler` shuffles, optionally groups examples of similar length
into a batch (for unpacked data: less padding), and splits batches over data-parallel ranks.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from falqon_dist.data.tokenization import IGNORE_INDEX, Example


def pack_examples(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Greedily pack ``examples`` (each at most ``max_length`` tokens) into rows of ≤ ``max_length``."""
    rows: list[Example] = []
    row: Example = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        n = len(example["input_ids"])
        if n > max_length:
            raise ValueError(
                f"cannot pack an example of {n} tokens into rows of max_length={max_length}"
            )
        if len(row["input_ids"]) + n > max_length:
            rows.append(row)
            row = {"input_ids": [], "labels": [], "position_ids": []}
        row["input_ids"].extend(example["input_ids"])
        row["labels"].extend(example["labels"])
        row["position_ids"].extend(range(n))
    if row["input_ids"]:
        rows.append(row)
    return rows


class Collator:
    """Pad a list of examples into a batch of tensors (see module docstring).

    Unpacked items give ``input_ids``, ``labels`` and ``attention_mask``; packed items (they carry
    ``position_ids``) give ``input_ids``, ``labels`` and ``position_ids``, whose padding tail starts
    a fresh position run so it forms its own (ignored) segment.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        width = max(len(item["input_ids"]) for item in items)
        packed = "position_ids" in items[0]
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        extra = torch.zeros((len(items), width), dtype=torch.long)
        for i, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[i, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(item["labels"], dtype=torch.long)
            if packed:
                extra[i, :n] = torch.tensor(item["position_ids"], dtype=torch.long)
                extra[i, n:] = torch.arange(width - n)
            else:
                extra[i, :n] = 1
        key = "position_ids" if packed else "attention_mask"
        return {"input_ids": input_ids, "labels": labels, key: extra}


class TrainBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler (for ``DataLoader(batch_sampler=...)``): shuffled batches, split over ranks.

    Per epoch: shuffle all indices (``seed + epoch``, identical on every rank). With
    ``group_by_length``, cut them into mega-batches of ``batch_size · num_replicas · group``, sort each
    by length and cut it into batches, so a batch holds examples of similar length (less padding);
    otherwise cut the shuffled order directly. Then shuffle the batch order and give rank ``r``
    batches ``r, r + num_replicas, …``. Every rank gets the same number of batches: trailing batches
    that cannot be shared evenly are dropped, and so are partial batches when ``drop_last``. Call
    :meth:`set_epoch` every epoch, as with ``DistributedSampler``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        group_by_length: bool = True,
        group: int = 32,
        drop_last: bool = False,
    ) -> None:
        if batch_size <= 0 or num_replicas <= 0 or not 0 <= rank < num_replicas or group <= 0:
            raise ValueError(
                f"invalid TrainBatchSampler(batch_size={batch_size}, num_replicas={num_replicas}, "
                f"rank={rank}, group={group})"
            )
        self.lengths = list(lengths)
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.group_by_length = seed, group_by_length
        self.group, self.drop_last = group, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (same order on every rank)."""
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        chunk_size = (
            self.batch_size * self.num_replicas * self.group if self.group_by_length else len(order)
        )
        batches: list[list[int]] = []
        for start in range(0, len(order), max(chunk_size, 1)):
            chunk = order[start : start + chunk_size]
            if self.group_by_length:
                chunk.sort(key=lambda i: self.lengths[i], reverse=True)
            batches.extend(
                chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)
            )
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.num_replicas
        return batches[self.rank : usable : self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
