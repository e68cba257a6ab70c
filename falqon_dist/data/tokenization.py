"""Tokenize ``{"prompt", "response"}`` records with the loss on response tokens only.

An example is ``prompt_ids + response_ids + [eos]``; ``labels`` equal ``input_ids`` except on the
prompt tokens, which are ``IGNORE_INDEX`` (-100), so the loss covers the response and its EOS.
Prompt and response are tokenized separately (the prompt with the tokenizer's special tokens, e.g.
BOS; the response without), which makes the prompt/response boundary exact for any tokenizer.

Truncation keeps the whole prompt and cuts the end of the response (its EOS is then lost). An example
whose prompt alone fills ``max_length`` — not one response token would survive — is dropped and
counted in :class:`TokenizeStats`, never silently trained on with an empty target.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

Example = dict[str, list[int]]


@dataclass
class TokenizeStats:
    """Counts from :func:`tokenize_records`."""

    #: Records seen.
    total: int = 0
    #: Examples kept (intact or truncated).
    kept: int = 0
    #: Kept examples whose response was cut at ``max_length``.
    truncated: int = 0
    #: Records dropped because no response token fitted within ``max_length``.
    dropped: int = 0


def special_ids(tokenizer) -> tuple[int, int]:
    """``(eos_id, pad_id)`` of ``tokenizer``; the pad id falls back to EOS when there is no pad token."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token; set one before building data")
    pad_id = tokenizer.pad_token_id
    return eos_id, eos_id if pad_id is None else pad_id


def tokenize_record(record: dict[str, str], tokenizer, max_length: int) -> tuple[Example | None, bool]:
    """``(example, truncated)`` for one record; ``example`` is None when the response cannot fit."""
    eos_id, _ = special_ids(tokenizer)
    prompt_ids = list(tokenizer(record["prompt"], add_special_tokens=True)["input_ids"])
    if prompt_ids and prompt_ids[-1] == eos_id:  # tokenizers whose post-processor appends EOS
        prompt_ids.pop()
    response_ids = list(tokenizer(record["response"], add_special_tokens=False)["input_ids"]) + [eos_id]
    room = max_length - len(prompt_ids)
    if room <= 0:
        return None, False
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }, truncated


def tokenize_records(
    records: Iterable[dict[str, str]], tokenizer, max_length: int
) -> tuple[list[Example], TokenizeStats]:
    """Tokenize every record (see module docstring); returns the kept examples and the counts."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    examples: list[Example] = []
    stats = TokenizeStats()
    for record in records:
        stats.total += 1
        example, truncated = tokenize_record(record, tokenizer, max_length)
        if example is None:
            stats.dropped += 1
            continue
        stats.kept += 1
        stats.truncated += int(truncated)
        examples.append(example)
    return examples, stats


class TokenizedDataset(torch.utils.data.Dataset):
    """A list of tokenized examples (``input_ids``, ``labels`` and, for packed rows, ``position_ids``)."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    @property
    def lengths(self) -> list[int]:
        """Token count of every example, for length-grouped batching."""
        return [len(example["input_ids"]) for example in self.examples]

    def num_target_tokens(self) -> int:
        """Tokens that carry a loss (labels other than ``IGNORE_INDEX``)."""
        return sum(sum(label != IGNORE_INDEX for label in example["labels"]) for example in self.examples)
