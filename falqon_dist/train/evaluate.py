"""Evaluation shared by all ranks: response-token loss (sharded) and exact match (synthetic task).

Under ZeRO-3 every rank must run the same number of forward passes (parameters are gathered
collectively), so the eval set is cut to a multiple of the world size and split evenly, and the
generation prompts are run on every rank (greedy decoding on identical weights gives identical
answers; ``synced_gpus`` keeps ranks in step regardless).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from falqon_dist.data import IGNORE_INDEX, evaluate_exact_match


@torch.no_grad()
def response_loss(model, dataset, collate_fn, num_samples: int, batch_size: int) -> float:
    """Token-weighted cross-entropy over response tokens of the first ``num_samples`` eval rows."""
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    usable = min(num_samples, len(dataset)) // world * world
    indices = list(range(rank, usable, world))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for start in range(0, len(indices), batch_size):
            batch = collate_fn([dataset[i] for i in indices[start : start + batch_size]])
            labels = batch.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits
            shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
            totals[0] += F.cross_entropy(
                shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"
            ).double()
            totals[1] += (shift_labels != IGNORE_INDEX).sum()
    finally:
        model.train(was_training)
    if tdist.is_initialized():
        tdist.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1))


def exact_match(model, tokenizer, records, num_samples: int, batch_size: int) -> float:
    """Greedy exact match on the first ``num_samples`` eval records (same work on every rank)."""
    synced = tdist.is_initialized() and tdist.get_world_size() > 1
    return evaluate_exact_match(
        model, tokenizer, records[:num_samples], batch_size=batch_size, generate_kwargs={"synced_gpus": synced}
    )
