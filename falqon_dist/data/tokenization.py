"""Tokenize records into examples whose ``labels`` carry the loss only where it belongs.

Three kinds of record (:mod:`falqon_dist.data.formats`):

* ``{"prompt", "response"}``: ``prompt_ids + response_ids + [eos]``; ``labels`` equal ``input_ids``
  except on the prompt tokens, which are ``IGNORE_INDEX`` (-100), so the loss covers the response
  and its EOS. Prompt and response are tokenized separately (the prompt with the tokenizer's special
  tokens, e.g. BOS; the response without), which makes the boundary exact for any tokenizer.
  Truncation keeps the whole prompt and cuts the end of the response (its EOS is then lost).
* ``{"messages"}`` (a conversation): rendered by the chat template into trained (assistant turns,
  through the end-of-turn token) and untrained segments (:mod:`falqon_dist.data.chat`), each
  tokenized on its own without added special tokens (the template writes them); truncation cuts
  the end.
* ``{"text"}``: ``bos + text + eos``, every token trained, cut into consecutive ``max_length``
  windows (nothing of a long document is lost; packing then fills rows with them).

``train_on_inputs`` puts the loss on the prompt / non-assistant tokens too. An example left with no
trained token within ``max_length`` (its prompt alone fills it) is dropped and counted in
:class:`TokenizeStats`, never silently trained on with an empty target.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from falqon_dist.data.chat import chat_segments

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
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token; set one before building data"
        )
    pad_id = tokenizer.pad_token_id
    return eos_id, eos_id if pad_id is None else pad_id


def tokenize_record(
    record: dict[str, str], tokenizer, max_length: int, *, train_on_inputs: bool = False
) -> tuple[Example | None, bool]:
    """``(example, truncated)`` for one prompt/response record; ``example`` is None when the response
    cannot fit."""
    eos_id, _ = special_ids(tokenizer)
    prompt_ids = list(tokenizer(record["prompt"], add_special_tokens=True)["input_ids"])
    if prompt_ids and prompt_ids[-1] == eos_id:  # tokenizers whose post-processor appends EOS
        prompt_ids.pop()
    response_ids = list(tokenizer(record["response"], add_special_tokens=False)["input_ids"]) + [
        eos_id
    ]
    room = max_length - len(prompt_ids)
    if room <= 0:
        return None, False
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": (prompt_ids if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids))
        + response_ids,
    }, truncated


def tokenize_conversation(
    messages: list[dict[str, str]], tokenizer, max_length: int, *, train_on_inputs: bool = False
) -> tuple[Example | None, bool]:
    """``(example, truncated)`` for one conversation; None when no trained token fits."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in chat_segments(tokenizer, messages, train_on_inputs=train_on_inputs):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None, False
    return {"input_ids": input_ids, "labels": labels}, truncated


def tokenize_text(text: str, tokenizer, max_length: int) -> list[Example]:
    """``bos + text + eos`` in consecutive windows of at most ``max_length`` tokens, all trained."""
    eos_id, _ = special_ids(tokenizer)
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if not ids or ids[-1] != eos_id:
        ids.append(eos_id)
    windows = [ids[start : start + max_length] for start in range(0, len(ids), max_length)]
    return [{"input_ids": window, "labels": list(window)} for window in windows if len(window) > 1]


def tokenize_records(
    records: Iterable[dict[str, Any]], tokenizer, max_length: int, *, train_on_inputs: bool = False
) -> tuple[list[Example], TokenizeStats]:
    """Tokenize every record (see module docstring); returns the kept examples and the counts."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    examples: list[Example] = []
    stats = TokenizeStats()
    for record in records:
        stats.total += 1
        if "text" in record:
            windows = tokenize_text(record["text"], tokenizer, max_length)
            stats.kept += bool(windows)
            stats.dropped += not windows
            examples += windows
            continue
        if "messages" in record:
            example, truncated = tokenize_conversation(
                record["messages"], tokenizer, max_length, train_on_inputs=train_on_inputs
            )
        else:
            example, truncated = tokenize_record(
                record, tokenizer, max_length, train_on_inputs=train_on_inputs
            )
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
        return sum(
            sum(label != IGNORE_INDEX for label in example["labels"]) for example in self.examples
        )
