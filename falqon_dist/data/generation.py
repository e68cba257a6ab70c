"""Greedy generation and generation-based evaluation (exact match) for causal LMs.

:func:`generate_answers` left-pads a batch of prompts (tokenized exactly as in training: with the
tokenizer's special tokens such as BOS), decodes greedily with ``model.generate`` and cuts each answer
at EOS and, by default, at the first newline. Works for plain and FALQON-converted Hugging Face
models, on CPU or GPU (inputs go to the device of the model's first parameter).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from falqon_dist.data.synthetic import exact_match
from falqon_dist.data.tokenization import IGNORE_INDEX, special_ids


def _prompt_ids(tokenizer, prompt: str, eos_id: int) -> list[int]:
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if ids and ids[-1] == eos_id:
        ids.pop()
    return ids


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    *,
    batch_size: int = 64,
    stop_at_newline: bool = True,
    generate_kwargs: dict[str, Any] | None = None,
) -> list[str]:
    """Greedy answers to ``prompts`` (prompt text excluded), stripped of surrounding whitespace.

    ``generate_kwargs`` go to ``model.generate`` (e.g. ``synced_gpus=True`` under ZeRO-3, where every
    rank must run the same number of forward passes).
    """
    eos_id, pad_id = special_ids(tokenizer)
    stop_ids = [eos_id]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if stop_at_newline and len(newline) == 1:
        stop_ids.append(newline[0])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = [_prompt_ids(tokenizer, p, eos_id) for p in prompts[start : start + batch_size]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, ids in enumerate(batch):
                input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[i, width - len(ids) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=pad_id,
                **(generate_kwargs or {}),
            )
            for row in output[:, width:].tolist():
                cut = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
                text = tokenizer.decode(row[:cut], skip_special_tokens=True)
                if stop_at_newline:
                    text = text.split("\n", 1)[0]
                answers.append(text.strip())
    finally:
        model.train(was_training)
    return answers


def evaluate_exact_match(
    model,
    tokenizer,
    records: Sequence[dict[str, str]],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    generate_kwargs: dict[str, Any] | None = None,
) -> float:
    """Exact match of greedy answers against the records' responses (synthetic-task metric).

    ``max_new_tokens`` defaults to the longest reference in tokens plus 2; ``generate_kwargs`` as in
    :func:`generate_answers`.
    """
    if max_new_tokens is None:
        max_new_tokens = 2 + max(
            len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in records
        )
    answers = generate_answers(
        model,
        tokenizer,
        [r["prompt"] for r in records],
        max_new_tokens,
        batch_size=batch_size,
        generate_kwargs=generate_kwargs,
    )
    return exact_match(answers, [r["response"] for r in records])


@torch.no_grad()
def response_loss_sums(
    model,
    dataset,
    collate_fn,
    indices: Sequence[int],
    *,
    batch_size: int = 64,
    groups: Sequence[int] | None = None,
    num_groups: int = 1,
) -> torch.Tensor:
    """``[[sum of cross-entropy, number of target tokens]]`` per group (``num_groups x 2``, float64,
    on the model's device) over the target (non-masked) tokens of ``dataset[i] for i in indices``;
    row ``i`` counts in group ``groups[i]`` (all in group 0 without ``groups``). Sums, so shards add
    up exactly. The grouping costs one ``index_add_`` per batch; the rows' group ids go to the device
    once, before the first batch."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(num_groups, 2, dtype=torch.float64, device=device)
    group_ids = torch.tensor(
        [groups[i] for i in indices] if groups is not None else [0] * len(indices),
        dtype=torch.long,
        device=device,
    )
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = collate_fn([dataset[i] for i in chunk])
            labels = batch.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits
            shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
            token_losses = F.cross_entropy(
                shift_logits.transpose(1, 2),
                shift_labels,
                ignore_index=IGNORE_INDEX,
                reduction="none",
            )
            rows = torch.stack(
                [token_losses.double().sum(1), (shift_labels != IGNORE_INDEX).sum(1).double()], 1
            )
            totals.index_add_(0, group_ids[start : start + batch_size], rows)
    finally:
        model.train(was_training)
    return totals


def mean_response_loss(model, dataset, collate_fn, *, batch_size: int = 64) -> float:
    """Token-weighted mean cross-entropy over all target (non-masked) tokens of ``dataset``."""
    ((loss, count),) = response_loss_sums(
        model, dataset, collate_fn, range(len(dataset)), batch_size=batch_size
    )
    return float(loss / count.clamp(min=1))
