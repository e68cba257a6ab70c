"""Evaluation shared by all ranks: response-token loss (sharded) and exact match (synthetic task).

Under ZeRO-3 every rank must run the same number of forward passes (parameters are gathered
collectively), so the eval set is cut to a multiple of the world size and split evenly, and the
generation prompts are run on every rank (greedy decoding on identical weights gives identical
answers; ``synced_gpus`` keeps ranks in step regardless).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as tdist

from falqon_dist.data import DataBundle, evaluate_exact_match
from falqon_dist.data.generation import response_loss_sums


def eval_losses(
    model, data: DataBundle, num_samples: int, batch_size: int
) -> tuple[float, dict[str, float | None]]:
    """The eval loss of the first ``num_samples`` eval rows of ``data`` and, for ``data=mix``, each
    source's (None where none of its rows was evaluated), from the same forward passes."""
    overall, per_group = response_losses(
        model,
        data.eval,
        data.collate_fn,
        num_samples,
        batch_size,
        groups=data.eval_groups or None,
        num_groups=max(1, len(data.mixture)),
    )
    return overall, {share.name: loss for share, loss in zip(data.mixture, per_group)}


def response_losses(
    model,
    dataset,
    collate_fn,
    num_samples: int,
    batch_size: int,
    *,
    groups: Sequence[int] | None = None,
    num_groups: int = 1,
) -> tuple[float, list[float | None]]:
    """Token-weighted cross-entropy over response tokens of the first ``num_samples`` rows, each rank
    taking every world-size-th row (one all-reduce of the sums), and the same loss per group of rows
    (``groups[i]``: row i's group; None for a group with no target token among the rows evaluated)."""
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    usable = min(num_samples, len(dataset)) // world * world
    totals = response_loss_sums(
        model,
        dataset,
        collate_fn,
        range(rank, usable, world),
        batch_size=batch_size,
        groups=groups,
        num_groups=num_groups,
    )
    if tdist.is_initialized():
        tdist.all_reduce(totals)
    overall = totals.sum(0)
    per_group = [(float(loss / count) if count > 0 else None) for loss, count in totals.tolist()]
    return float(overall[0] / overall[1].clamp(min=1)), per_group


def greedy_exact_match(model, tokenizer, records, num_samples: int, batch_size: int) -> float:
    """Greedy exact match on the first ``num_samples`` eval records (same work on every rank)."""
    synced = tdist.is_initialized() and tdist.get_world_size() > 1
    return evaluate_exact_match(
        model,
        tokenizer,
        records[:num_samples],
        batch_size=batch_size,
        generate_kwargs={"synced_gpus": synced},
    )
