"""Conversations rendered with the tokenizer's chat template, split into trained and untrained text.

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}`` turns.
Its text is what ``tokenizer.apply_chat_template`` renders: the model is trained on exactly the
format it will be prompted with. To put the loss on the assistant turns only (all of them), the
conversation is rendered turn by turn: for assistant turn ``i``,

    before_i = render(turns[:i], add_generation_prompt=True)   # ... up to the assistant header
    after_i  = render(turns[:i + 1])                            # ... through the turn's end

``after_i[len(before_i):]`` is the assistant's text *as the template writes it*, ending with the
template's own end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ...), and carries the
loss; everything between two assistant turns (system and user turns, headers) does not. A template
that does not render a conversation as a prefix of its continuation cannot be split this way and
is refused with its name.

A tokenizer without a template (the embedded tiny model's) gets :data:`DEFAULT_CHAT_TEMPLATE`:
``### System:`` / ``### User:`` / ``### Assistant:`` headers, each assistant turn ending with the
tokenizer's EOS (its end-of-turn token). The rendered text already holds the special tokens the
template wants (a BOS included), so segments are tokenized without adding any.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: The template of tokenizers that have none (see the module docstring).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

Turn = Mapping[str, str]
#: (text, trained): consecutive pieces of a rendered conversation.
Segment = tuple[str, bool]


class ChatTemplateError(ValueError):
    """A chat template that cannot be split into trained and untrained text."""


def chat_template(tokenizer) -> str:
    """The tokenizer's own chat template, or :data:`DEFAULT_CHAT_TEMPLATE` when it has none."""
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def render(tokenizer, turns: Sequence[Turn], *, add_generation_prompt: bool = False) -> str:
    """``turns`` as text, with the tokenizer's template (or the default one)."""
    return tokenizer.apply_chat_template(
        [dict(turn) for turn in turns],
        chat_template=chat_template(tokenizer),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def chat_segments(
    tokenizer, turns: Sequence[Turn], *, train_on_inputs: bool = False
) -> list[Segment]:
    """The rendered conversation as consecutive ``(text, trained)`` segments: the assistant turns
    (through the template's end-of-turn token) trained, the rest not, unless ``train_on_inputs``."""
    segments: list[Segment] = []
    done = ""  # the text rendered so far
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = render(tokenizer, turns[:i], add_generation_prompt=True)
        after = render(tokenizer, turns[: i + 1])
        if not before.startswith(done) or not after.startswith(before):
            raise ChatTemplateError(
                f"the chat template of {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '')!r}) does "
                "not render a conversation as a prefix of its continuation, so the assistant turns cannot be "
                "told apart from the rest; use data=jsonl with prompt/response rows instead"
            )
        segments += [(before[len(done) :], train_on_inputs), (after[len(before) :], True)]
        done = after
    rest = render(tokenizer, turns)[len(done) :]
    if rest:
        segments.append((rest, train_on_inputs))
    return [(text, trained) for text, trained in segments if text]
