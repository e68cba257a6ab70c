"""Evaluation shared by all ranks: response-token loss (sharded) and exact match (synthetic task).

Under ZeRO-3 every rank must run the same number of forward passes (parameters are gathered
collectively), so the eval set is cut to a multiple of the world size and split evenly, and the
generation prompts are run on every rank (greedy decoding on identical weights gives identical
answers; ``synced_gpus`` keeps ranks in step regardless).
"""

from __future__ import annotations

import torch.distributed as tdist

from falqon_dist.data import evaluate_exact_match
from falqon_dist.data.generation import response_loss_sums


def response_loss(model, dataset, collate_fn, num_samples: int, batch_size: int) -> float:
    """Token-weighted cross-entropy over response tokens of the first ``num_samples`` eval rows,
    each rank taking every world-size-th row (one all-reduce of the sums)."""
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    usable = min(num_samples, len(dataset)) // world * world
    totals = response_loss_sums(model, dataset, collate_fn, range(rank, usable, world), batch_size=batch_size)
    if tdist.is_initialized():
        tdist.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1))


def greedy_exact_match(model, tokenizer, records, num_samples: int, batch_size: int) -> float:
    """Greedy exact match on the first ``num_samples`` eval records (same work on every rank)."""
    synced = tdist.is_initialized() and tdist.get_world_size() > 1
    return evaluate_exact_match(
        model, tokenizer, records[:num_samples], batch_size=batch_size, generate_kwargs={"synced_gpus": synced}
    )
