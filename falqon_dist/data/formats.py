"""Normalize dataset rows to ``{"prompt", "response"}`` records.

* **Alpaca** rows ``{"instruction", "input" (optional), "output"}`` are formatted with the standard
  Alpaca prompt template (with or without the input section).
* **Generic jsonl** rows are ``{"prompt", "response"}`` (used verbatim) or Alpaca rows.
* **OASST1** rows are messages ``{"message_id", "parent_id", "role", "text"}`` (optionally ``lang``,
  ``rank``, ``deleted``). Every prompter message with at least one assistant reply gives one pair;
  the reply kept is the best-ranked one (lowest ``rank``; unranked replies after ranked ones, ties in
  file order). Pairs are single-turn: the prompt is the prompter message alone, wrapped in the Alpaca
  no-input template, even inside a longer thread. Deleted messages are skipped.

A malformed row raises :class:`DataFormatError` naming where it is (``where``: file and line/row) and
what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Record = dict[str, str]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
OASST_ROLES = ("prompter", "assistant")


class DataFormatError(ValueError):
    """A dataset row (or file) does not have the expected shape."""


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else f"string {value[:40]!r}"
    return f"{type(value).__name__} {str(value)[:40]}"


def _text(row: Mapping[str, Any], field: str, where: str, *, optional: bool = False) -> str:
    """``row[field]`` as a non-empty string (``""`` for an absent/null/empty optional field)."""
    value = row.get(field)
    if optional and (value is None or value == ""):
        return ""
    if not isinstance(value, str) or not value.strip():
        got = "missing" if field not in row else _describe(value)
        need = "a string (or null)" if optional else "a non-empty string"
        raise DataFormatError(f"{where}: field {field!r} must be {need}, got {got}")
    return value


def normalize_alpaca(row: Mapping[str, Any], where: str) -> Record:
    """An Alpaca row as a record with the standard Alpaca prompt template."""
    if not isinstance(row, Mapping):
        raise DataFormatError(f"{where}: expected an object with 'instruction', 'output' (and optional 'input')")
    instruction = _text(row, "instruction", where)
    extra = _text(row, "input", where, optional=True)
    output = _text(row, "output", where)
    if extra.strip():
        prompt = ALPACA_PROMPT.format(instruction=instruction, input=extra)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return {"prompt": prompt, "response": output}


def normalize_generic(row: Mapping[str, Any], where: str) -> Record:
    """A ``{"prompt", "response"}`` row verbatim, or an Alpaca row formatted."""
    if not isinstance(row, Mapping):
        raise DataFormatError(f"{where}: expected an object with 'prompt' and 'response'")
    # Absent and null are the same here: ``datasets`` fills fields missing from a row with null.
    present = {key for key, value in row.items() if value is not None}
    if not {"prompt", "response"} & present and "instruction" in present:
        return normalize_alpaca(row, where)
    if not {"prompt", "response"} & present:
        raise DataFormatError(
            f"{where}: expected an object with 'prompt' and 'response' (or Alpaca 'instruction'/'output')"
        )
    return {"prompt": _text(row, "prompt", where), "response": _text(row, "response", where)}


def _rank(row: Mapping[str, Any], where: str) -> float:
    rank = row.get("rank")
    if rank is None:
        return float("inf")
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise DataFormatError(f"{where}: field 'rank' must be a number or null, got {_describe(rank)}")
    return float(rank)


def oasst_pairs(rows: Sequence[Mapping[str, Any]], wheres: Sequence[str], lang: str | None = None) -> list[Record]:
    """Prompter→assistant pairs from OASST1 message rows (see module docstring), in prompt order."""
    prompts: dict[str, tuple[int, str, str | None]] = {}  # message_id -> (row index, text, lang)
    best: dict[str, tuple[float, int, str]] = {}  # prompter id -> (rank, row index, reply text)
    for index, (row, where) in enumerate(zip(rows, wheres, strict=True)):
        if not isinstance(row, Mapping):
            raise DataFormatError(f"{where}: expected an OASST1 message object")
        message_id = _text(row, "message_id", where)
        parent_id = row.get("parent_id")
        if parent_id is not None and not isinstance(parent_id, str):
            raise DataFormatError(f"{where}: field 'parent_id' must be a string or null, got {_describe(parent_id)}")
        role = row.get("role")
        if role not in OASST_ROLES:
            raise DataFormatError(f"{where}: field 'role' must be one of {OASST_ROLES}, got {_describe(role)}")
        text = _text(row, "text", where)
        if row.get("deleted") is True:
            continue
        if role == "prompter":
            row_lang = row.get("lang")
            prompts[message_id] = (index, text, row_lang if isinstance(row_lang, str) else None)
        elif parent_id is not None:
            candidate = (_rank(row, where), index, text)
            if parent_id not in best or candidate[:2] < best[parent_id][:2]:
                best[parent_id] = candidate
    pairs = []
    for message_id, (_, text, row_lang) in sorted(prompts.items(), key=lambda item: item[1][0]):
        if message_id in best and (lang is None or row_lang == lang):
            pairs.append({"prompt": ALPACA_PROMPT_NO_INPUT.format(instruction=text), "response": best[message_id][2]})
    return pairs
