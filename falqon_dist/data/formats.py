"""Normalize dataset rows to records: prompt/response pairs, conversations or plain text.

* **Alpaca** rows ``{"instruction", "input" (optional), "output"}`` are formatted with the standard
  Alpaca prompt template (with or without the input section).
* **Generic jsonl** rows are ``{"prompt", "response"}`` (used verbatim) or Alpaca rows.
* **Chat** rows are OpenAI-style ``{"messages": [{"role", "content"}]}`` (roles system, user,
  assistant) or ShareGPT ``{"conversations": [{"from", "value"}]}`` (from system, human/user,
  gpt/assistant), kept as ``{"messages"}`` conversations for the chat template
  (:mod:`falqon_dist.data.chat`).
* **Text** rows are ``{"text"}`` (or whole ``.txt`` files), trained on every token.
* **OASST1** rows are messages ``{"message_id", "parent_id", "role", "text"}`` (optionally ``lang``,
  ``rank``, ``deleted``). Each thread becomes one multi-turn conversation: from its first prompter
  message (``lang`` filters on it), each prompter turn is followed by its best-ranked assistant reply
  (lowest ``rank``; unranked replies after ranked ones, ties in file order), each assistant turn by
  its best-ranked prompter follow-up, until a message has no reply. A prompter message whose parent
  is not in the file (a split of a thread) starts a thread. Deleted messages and their subtrees are
  skipped.

A malformed row raises :class:`DataFormatError` naming where it is (``where``: file and line/row) and
what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: ``{"prompt", "response"}``, ``{"messages": [{"role", "content"}, ...]}`` or ``{"text"}``.
Record = dict[str, Any]

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
#: ShareGPT speakers, and how chat roles are named in a conversation.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
CHAT_ROLES = {**SHAREGPT_ROLES}


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
        raise DataFormatError(
            f"{where}: expected an object with 'instruction', 'output' (and optional 'input')"
        )
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
        raise DataFormatError(
            f"{where}: field 'rank' must be a number or null, got {_describe(rank)}"
        )
    return float(rank)


def _turn(turn: Any, index: int, field: str, where: str) -> dict[str, str]:
    """One turn of a ``messages`` (role/content) or ShareGPT ``conversations`` (from/value) list."""
    at = f"{where}: {field}[{index}]"
    if not isinstance(turn, Mapping):
        raise DataFormatError(f"{at}: expected an object, got {_describe(turn)}")
    role_key, text_key = ("role", "content") if field == "messages" else ("from", "value")
    speaker = turn.get(role_key)
    role = CHAT_ROLES.get(speaker) if isinstance(speaker, str) else None
    if role is None:
        valid = ("system", "user", "assistant") if field == "messages" else tuple(SHAREGPT_ROLES)
        raise DataFormatError(
            f"{at}: field {role_key!r} must be one of {valid}, got {_describe(speaker)}"
        )
    content = turn.get(text_key)
    if isinstance(content, list):
        raise DataFormatError(
            f"{at}: field {text_key!r} is a list of content parts; only text (a string) is supported"
        )
    return {"role": role, "content": _text(turn, text_key, at)}


def normalize_chat(row: Mapping[str, Any], where: str) -> Record:
    """A conversation row: OpenAI-style ``{"messages": [{"role", "content"}, ...]}`` or ShareGPT
    ``{"conversations": [{"from", "value"}, ...]}``, as ``{"messages": [{"role", "content"}]}``.

    Roles are system (first turn only), user and assistant; at least one assistant turn."""
    field = next(
        (
            f
            for f in ("messages", "conversations")
            if isinstance(row, Mapping) and row.get(f) is not None
        ),
        None,
    )
    if field is None:
        raise DataFormatError(
            f"{where}: expected an object with 'messages' (a list of {{'role', 'content'}}) or ShareGPT "
            "'conversations' (a list of {'from', 'value'})"
        )
    turns = row[field]
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(
            f"{where}: field {field!r} must be a non-empty list of turns, got {_describe(turns)}"
        )
    messages = [_turn(turn, i, field, where) for i, turn in enumerate(turns)]
    for i, message in enumerate(messages[1:], start=1):
        if message["role"] == "system":
            raise DataFormatError(f"{where}: {field}[{i}]: a system turn may only come first")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"{where}: {field} has no assistant turn: nothing to train on")
    return {"messages": messages}


def normalize_text(row: Mapping[str, Any], where: str) -> Record:
    """A plain-text row ``{"text": ...}`` (every token trained)."""
    if not isinstance(row, Mapping):
        raise DataFormatError(f"{where}: expected an object with 'text'")
    return {"text": _text(row, "text", where)}


def oasst_conversations(
    rows: Sequence[Mapping[str, Any]], wheres: Sequence[str], lang: str | None = None
) -> list[Record]:
    """OASST1 message trees as multi-turn conversations (see module docstring), in thread order."""
    messages: dict[str, tuple[str, str, str | None]] = {}  # message_id -> (role, text, lang)
    # parent -> [(rank, row index, id)]
    children: dict[str | None, list[tuple[float, int, str]]] = {}
    order: list[str] = []
    deleted: set[str] = set()
    for index, (row, where) in enumerate(zip(rows, wheres, strict=True)):
        if not isinstance(row, Mapping):
            raise DataFormatError(f"{where}: expected an OASST1 message object")
        message_id = _text(row, "message_id", where)
        parent_id = row.get("parent_id")
        if parent_id is not None and not isinstance(parent_id, str):
            raise DataFormatError(
                f"{where}: field 'parent_id' must be a string or null, got {_describe(parent_id)}"
            )
        role = row.get("role")
        if role not in OASST_ROLES:
            raise DataFormatError(
                f"{where}: field 'role' must be one of {OASST_ROLES}, got {_describe(role)}"
            )
        text = _text(row, "text", where)
        rank = _rank(row, where)
        if row.get("deleted") is True:
            deleted.add(message_id)
            continue
        row_lang = row.get("lang")
        messages[message_id] = (role, text, row_lang if isinstance(row_lang, str) else None)
        children.setdefault(parent_id, []).append((rank, index, message_id))
        order.append(message_id)
    parents = {child: parent for parent, kids in children.items() for _, _, child in kids}

    def best_reply(message_id: str, role: str) -> str | None:
        replies = sorted(kid for kid in children.get(message_id, []) if messages[kid[2]][0] == role)
        return replies[0][2] if replies else None

    conversations: list[Record] = []
    for message_id in order:
        role, _, row_lang = messages[message_id]
        parent = parents.get(message_id)
        # not the start of a thread here
        if role != "prompter" or parent in messages or parent in deleted:
            continue
        if lang is not None and row_lang != lang:
            continue
        turns: list[dict[str, str]] = []
        node: str | None = message_id
        while node is not None:
            node_role, text, _ = messages[node]
            turns.append(
                {"role": "user" if node_role == "prompter" else "assistant", "content": text}
            )
            node = best_reply(node, "assistant" if node_role == "prompter" else "prompter")
        if turns[-1]["role"] == "user":
            turns.pop()  # a final prompter message without a reply: nothing to learn from it
        if turns:
            conversations.append({"messages": turns})
    return conversations
