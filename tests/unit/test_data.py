"""Data pipeline: formats, errors, prompt masking, packing, truncation, synthetic task, config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from falqon_dist.data import (
    IGNORE_INDEX,
    DataConfig,
    DataFormatError,
    build_data,
    exact_match,
    generate_answers,
    load_split_records,
)
from falqon_dist.data.collate import Collator, TrainBatchSampler, pack_examples
from falqon_dist.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from falqon_dist.data.synthetic import (
    FINETUNE_TASKS,
    PRETRAIN_TASKS,
    finetune_splits,
    pretrain_corpus,
)
from falqon_dist.data.tokenization import tokenize_record, tokenize_records
from falqon_dist.models.tiny import tiny_config
from falqon_dist.models.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    )
    return path


ALPACA_ROWS = [
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a color.", "output": "red"},
    {"instruction": "Count to two.", "input": None, "output": "1 2"},
]


# ---------------------------------------------------------------- formats


def test_alpaca_jsonl_uses_standard_template(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    train, evals = load_split_records(DataConfig(name="alpaca", path=str(path), eval_fraction=0.25))
    records = sorted(train + evals, key=lambda r: r["response"])
    by_response = {r["response"]: r["prompt"] for r in records}
    assert len(train) == 3 and len(evals) == 1
    assert by_response["hi"] == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert by_response["5"] == ALPACA_PROMPT.format(instruction="Add the numbers.", input="2 and 3")
    assert by_response["red"] == ALPACA_PROMPT_NO_INPUT.format(instruction="Name a color.")
    assert by_response["1 2"].endswith("### Instruction:\nCount to two.\n\n### Response:\n")


def test_alpaca_json_array_file(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(ALPACA_ROWS, indent=1))
    train, evals = load_split_records(DataConfig(name="alpaca", path=str(path), eval_fraction=0.25))
    assert sorted(r["response"] for r in train + evals) == ["1 2", "5", "hi", "red"]


def test_generic_jsonl_prompt_response_and_alpaca_rows(tmp_path):
    rows = [{"prompt": f"q{i}=", "response": f"a{i}"} for i in range(9)] + [ALPACA_ROWS[1]]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    train, evals = load_split_records(
        DataConfig(name="jsonl", path=str(path), eval_fraction=0.2, seed=3)
    )
    assert len(train) == 8 and len(evals) == 2
    records = train + evals
    assert {"prompt": "q4=", "response": "a4"} in records
    assert {
        "prompt": ALPACA_PROMPT.format(instruction="Add the numbers.", input="2 and 3"),
        "response": "5",
    } in records
    # The split is seeded: same seed, same split.
    again = load_split_records(DataConfig(name="jsonl", path=str(path), eval_fraction=0.2, seed=3))
    assert again == (train, evals)


def test_directory_with_train_and_validation_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"t{i}", "response": "x"} for i in range(5)])
    write_jsonl(tmp_path / "validation.jsonl", [{"prompt": "v0", "response": "y"}])
    train, evals = load_split_records(DataConfig(name="jsonl", path=str(tmp_path)))
    assert [r["prompt"] for r in train] == [f"t{i}" for i in range(5)]
    assert evals == [{"prompt": "v0", "response": "y"}]


def oasst_rows() -> list[dict]:
    return [
        {"message_id": "p1", "parent_id": None, "role": "prompter", "text": "Hello?", "lang": "en"},
        {
            "message_id": "a1",
            "parent_id": "p1",
            "role": "assistant",
            "text": "second best",
            "lang": "en",
            "rank": 1,
        },
        {
            "message_id": "a2",
            "parent_id": "p1",
            "role": "assistant",
            "text": "best",
            "lang": "en",
            "rank": 0,
        },
        {"message_id": "p2", "parent_id": "a2", "role": "prompter", "text": "Why?", "lang": "en"},
        {
            "message_id": "a3",
            "parent_id": "p2",
            "role": "assistant",
            "text": "Because.",
            "lang": "en",
            "rank": None,
        },
        {"message_id": "p3", "parent_id": None, "role": "prompter", "text": "Hola", "lang": "es"},
        {
            "message_id": "a4",
            "parent_id": "p3",
            "role": "assistant",
            "text": "borrado",
            "deleted": True,
        },
        {
            "message_id": "a5",
            "parent_id": "p3",
            "role": "assistant",
            "text": "Buenas",
            "lang": "es",
        },
        {
            "message_id": "p4",
            "parent_id": None,
            "role": "prompter",
            "text": "No answer here",
            "lang": "en",
        },
    ]


def _conversation(*texts: str) -> dict:
    return {
        "messages": [
            {"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)
        ]
    }


def test_oasst1_threads_become_multi_turn_conversations_of_best_ranked_replies(tmp_path):
    write_jsonl(tmp_path / "oasst_train.jsonl", oasst_rows())
    write_jsonl(
        tmp_path / "oasst_validation.jsonl",
        [
            {
                "message_id": "q1",
                "parent_id": None,
                "role": "prompter",
                "text": "Eval?",
                "lang": "en",
            },
            {
                "message_id": "r1",
                "parent_id": "q1",
                "role": "assistant",
                "text": "Yes.",
                "lang": "en",
            },
        ],
    )
    train, evals = load_split_records(DataConfig(name="oasst1", path=str(tmp_path)))
    assert train == [
        _conversation("Hello?", "best", "Why?", "Because."),
        _conversation("Hola", "Buenas"),
    ]
    assert evals == [_conversation("Eval?", "Yes.")]
    train_en, _ = load_split_records(DataConfig(name="oasst1", path=str(tmp_path), lang="en"))
    assert train_en == [_conversation("Hello?", "best", "Why?", "Because.")]


def test_oasst1_parquet_directory(tmp_path):
    import datasets

    rows = [
        {**row, "rank": row.get("rank"), "deleted": row.get("deleted", False)}
        for row in oasst_rows()
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "train-00000.parquet"))
    datasets.Dataset.from_list(rows[:2]).to_parquet(str(tmp_path / "validation-00000.parquet"))
    train, evals = load_split_records(DataConfig(name="oasst1", path=str(tmp_path)))
    assert [len(c["messages"]) for c in train] == [4, 2]
    assert evals == [_conversation("Hello?", "second best")]


CHAT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
    {
        "conversations": [
            {"from": "human", "value": "Name a color"},
            {"from": "gpt", "value": "red"},
        ]
    },
]


def _trained_text(tokenizer, example) -> str:
    return tokenizer.decode(
        [
            t
            for t, label in zip(example["input_ids"], example["labels"], strict=True)
            if label != IGNORE_INDEX
        ]
    )


def test_chat_rows_are_rendered_with_the_template_and_train_every_assistant_turn(
    tmp_path, tokenizer
):
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS * 4)
    train, _ = load_split_records(DataConfig(name="chat", path=str(path), eval_fraction=0.25))
    assert {"role": "user", "content": "Name a color"} in next(
        c for c in train if len(c["messages"]) == 2
    )["messages"]
    examples, stats = tokenize_records(CHAT_ROWS[:1], tokenizer, max_length=128)
    (example,) = examples
    text = tokenizer.decode(example["input_ids"])
    # the default template
    assert text == (
        "<s>### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello</s>\n\n"
        "### User:\n2+2?\n\n### Assistant:\n4</s>\n\n"
    )
    # both assistant turns, each through its end-of-turn token (EOS here), nothing of the user's
    assert _trained_text(tokenizer, example) == "Hello</s>\n\n4</s>\n\n"
    everything, _ = tokenize_records(CHAT_ROWS[:1], tokenizer, max_length=128, train_on_inputs=True)
    assert (
        IGNORE_INDEX not in everything[0]["labels"]
        and everything[0]["input_ids"] == example["input_ids"]
    )


def test_chat_uses_the_tokenizers_own_template_and_its_end_of_turn_token(tokenizer):
    import copy

    chatml = copy.deepcopy(tokenizer)
    chatml.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    from falqon_dist.data.formats import normalize_chat

    (example,), _ = tokenize_records([normalize_chat(CHAT_ROWS[1], "row")], chatml, max_length=256)
    assert chatml.decode(example["input_ids"]).startswith(
        "<|im_start|>user\nName a color<|im_end|>"
    )
    assert _trained_text(chatml, example) == "red<|im_end|>\n"


def test_a_chat_template_that_is_not_a_prefix_is_refused(tokenizer):
    import copy

    from falqon_dist.data.chat import ChatTemplateError

    odd = copy.deepcopy(tokenizer)
    odd.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="prefix"):
        tokenize_records(CHAT_ROWS[:1], odd, max_length=128)


def test_text_rows_and_txt_files_train_every_token_in_windows(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("lorem ipsum " * 20)
    (tmp_path / "b.txt").write_text("dolor sit amet")
    train, evals = load_split_records(
        DataConfig(name="text", path=str(tmp_path), eval_fraction=0.5)
    )
    assert sorted(r["text"][:5] for r in train + evals) == ["dolor", "lorem"]
    examples, stats = tokenize_records([{"text": "lorem ipsum " * 20}], tokenizer, max_length=64)
    # 1 + 240 + 1 tokens
    assert stats.kept == 1 and [len(e["input_ids"]) for e in examples] == [64, 64, 64, 50]
    assert all(e["labels"] == e["input_ids"] for e in examples)
    assert (
        examples[0]["input_ids"][0] == tokenizer.bos_token_id
        and examples[-1]["input_ids"][-1] == tokenizer.eos_token_id
    )
    rows = (
        write_jsonl(tmp_path / "rows" / "t.jsonl", [{"text": f"doc {i}"} for i in range(10)])
        if ((tmp_path / "rows").mkdir() or True)
        else None
    )
    bundle = build_data(
        DataConfig(name="text", path=str(rows), max_length=32, packing=True), tokenizer
    )
    assert bundle.train.num_target_tokens() == sum(
        len(e["input_ids"]) for e in bundle.train.examples
    )


def test_train_on_inputs_puts_the_loss_on_the_prompt_too(tokenizer):
    record = {"prompt": "sub(5,3)=", "response": "2"}
    (masked,), _ = tokenize_records([record], tokenizer, max_length=32)
    (full,), _ = tokenize_records([record], tokenizer, max_length=32, train_on_inputs=True)
    assert (
        masked["input_ids"] == full["input_ids"] == full["labels"]
        and IGNORE_INDEX in masked["labels"]
    )


def test_a_save_to_disk_directory_and_a_list_of_paths(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(6)]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:4]),
            "validation": datasets.Dataset.from_list(rows[4:]),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    train, evals = load_split_records(DataConfig(name="jsonl", path=str(tmp_path / "dd")))
    assert [r["prompt"] for r in train] == ["q0", "q1", "q2", "q3"] and [
        r["prompt"] for r in evals
    ] == ["q4", "q5"]
    train, evals = load_split_records(
        DataConfig(name="jsonl", path=str(tmp_path / "ds"), eval_fraction=0.2)
    )
    assert len(train) == 5 and len(evals) == 1
    extra = write_jsonl(
        tmp_path / "extra.jsonl",
        [{"prompt": "x", "response": "y"}, {"prompt": "z", "response": "w"}],
    )
    both = DataConfig(name="jsonl", path=[str(tmp_path / "dd"), str(extra)], eval_fraction=0.5)
    assert both.path == (str(tmp_path / "dd"), str(extra))
    train, evals = load_split_records(both)
    assert len(train) == 5 and len(evals) == 3  # dd's own split + extra split in half
    # interleaved: both sources first
    assert [r["prompt"] for r in evals][:2] in (["q4", "x"], ["q4", "z"])
    datasets.DatasetDict(
        {"other": datasets.Dataset.from_list(rows), "more": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(tmp_path / "nosplit"))
    with pytest.raises(DataFormatError, match="without a 'train' split"):
        load_split_records(DataConfig(name="jsonl", path=str(tmp_path / "nosplit")))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "rows", "where", "expected"),
    [
        (
            "jsonl",
            [{"prompt": "a", "response": "b"}, "{not json", {"prompt": "c", "response": "d"}],
            "line 2",
            "invalid JSON",
        ),
        ("jsonl", [{"prompt": "a", "response": "b"}, "", {"prompt": "c"}], "line 3", "'response'"),
        (
            "jsonl",
            [{"prompt": "a", "response": 7}],
            "line 1",
            "'response' must be a non-empty string",
        ),
        (
            "jsonl",
            [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": "   "}],
            "line 2",
            "empty",
        ),
        ("jsonl", [[1, 2]], "line 1", "expected a JSON object"),
        ("jsonl", [{"question": "a", "answer": "b"}], "line 1", "'prompt' and 'response'"),
        ("alpaca", [ALPACA_ROWS[0], {"instruction": "x", "output": ""}], "line 2", "'output'"),
        ("alpaca", [{"instruction": "x", "input": 3, "output": "y"}], "line 1", "'input'"),
        (
            "oasst1",
            [oasst_rows()[0], {"message_id": "m", "parent_id": "p1", "role": "bot", "text": "t"}],
            "line 2",
            "'role'",
        ),
        (
            "oasst1",
            [{"message_id": "m", "parent_id": None, "role": "prompter"}],
            "line 1",
            "'text'",
        ),
        ("chat", [CHAT_ROWS[0], {"prompt": "a", "response": "b"}], "line 2", "'messages'"),
        (
            "chat",
            [{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
            "line 1",
            "messages[1]: field 'role' must be one of",
        ),
        ("chat", [{"messages": [{"role": "user", "content": "a"}]}], "line 1", "no assistant turn"),
        (
            "chat",
            [{"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "b"}]}],
            "line 1",
            "conversations[0]: field 'value'",
        ),
        (
            "chat",
            [{"messages": [{"role": "user", "content": [{"type": "text"}]}]}],
            "line 1",
            "content parts",
        ),
        ("text", [{"text": "fine"}, {"body": "x"}], "line 2", "'text'"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, name, rows, where, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataFormatError) as info:
        load_split_records(DataConfig(name=name, path=str(path)))
    message = str(info.value)
    assert str(path) in message and where in message and expected in message, message


def test_malformed_json_array_row(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ALPACA_ROWS[0], ALPACA_ROWS[1], {"instruction": "x"}]))
    with pytest.raises(DataFormatError, match=r"data\.json: row 3: field 'output'"):
        load_split_records(DataConfig(name="alpaca", path=str(path)))


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    for name in ("jsonl", "alpaca", "oasst1"):
        with pytest.raises(FileNotFoundError, match=str(missing)):
            load_split_records(DataConfig(name=name, path=str(missing)))


def test_hub_name_without_network_fails_clearly(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        FileNotFoundError, match="no-such-owner/no-such-dataset.*hub failed.*ConnectionError"
    ):
        load_split_records(DataConfig(name="alpaca", path="no-such-owner/no-such-dataset"))
    # path=None: the default hub dataset
    with pytest.raises(FileNotFoundError, match="tatsu-lab/alpaca"):
        load_split_records(DataConfig(name="alpaca"))


# ---------------------------------------------------------------- tokenization, masking, truncation


def test_prompt_masking_and_padding(tokenizer):
    records = [
        {"prompt": "sub(57,23)=", "response": "34"},
        {"prompt": "copy(ab)=", "response": "abcdefg"},
    ]
    examples, stats = tokenize_records(records, tokenizer, max_length=64)
    assert stats.kept == 2 and stats.truncated == stats.dropped == 0
    for record, example in zip(records, examples, strict=True):
        prompt_ids = tokenizer(record["prompt"])["input_ids"]
        response_ids = tokenizer(record["response"], add_special_tokens=False)["input_ids"]
        assert prompt_ids[0] == tokenizer.bos_token_id
        assert example["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
        assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [
            tokenizer.eos_token_id
        ]
    batch = Collator(tokenizer.pad_token_id)(examples)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (2, max(lengths))
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["labels"][i, :n].tolist() == examples[i]["labels"]


def test_truncation_cuts_response_and_drops_prompt_only_examples(tokenizer):
    prompt = "rev(abcdef)="  # 1 BOS + 12 characters
    records = [
        {"prompt": prompt, "response": "fedcba"},  # 13 + 6 + EOS = 20 tokens
        {"prompt": "x" * 30, "response": "never fits"},
        {"prompt": "ok=", "response": "y"},
    ]
    examples, stats = tokenize_records(records, tokenizer, max_length=16)
    assert (stats.total, stats.kept, stats.truncated, stats.dropped) == (3, 2, 1, 1)
    cut = examples[0]
    assert len(cut["input_ids"]) == 16
    assert tokenizer.decode(cut["input_ids"], skip_special_tokens=True) == prompt + "fed"
    assert cut["labels"][:13] == [IGNORE_INDEX] * 13 and IGNORE_INDEX not in cut["labels"][13:]
    assert tokenizer.eos_token_id not in cut["input_ids"]  # the EOS was cut with the tail
    example, truncated = tokenize_record({"prompt": "x" * 14, "response": "abc"}, tokenizer, 16)
    assert (
        example is not None
        and truncated
        and example["labels"][-1] == tokenizer.encode("a", add_special_tokens=False)[0]
    )


def test_build_data_counts_dropped_examples(tmp_path, tokenizer):
    rows = [{"prompt": "p" * (40 if i % 4 == 0 else 3), "response": "r"} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    bundle = build_data(
        DataConfig(name="jsonl", path=str(path), max_length=16, eval_fraction=0.1), tokenizer
    )
    stats = bundle.train_stats
    assert stats.total == 36 and stats.dropped + bundle.eval_stats.dropped == 10
    assert len(bundle.train) == stats.kept == stats.total - stats.dropped


# ---------------------------------------------------------------- packing


def test_packing_boundaries_and_labels(tokenizer):
    records = pretrain_corpus(50, seed=1)
    examples, _ = tokenize_records(records, tokenizer, max_length=32)
    rows = pack_examples(examples, max_length=32)
    assert len(rows) < len(examples)
    # Rows hold whole examples in order; nothing lost, nothing split.
    flat_ids = [t for row in rows for t in row["input_ids"]]
    flat_labels = [t for row in rows for t in row["labels"]]
    assert flat_ids == [t for e in examples for t in e["input_ids"]]
    assert flat_labels == [t for e in examples for t in e["labels"]]
    starts = iter(examples)
    for row in rows:
        assert len(row["input_ids"]) <= 32
        pos = row["position_ids"]
        boundaries = [i for i, p in enumerate(pos) if p == 0]
        assert boundaries[0] == 0
        for begin, end in zip(boundaries, boundaries[1:] + [len(pos)], strict=True):
            example = next(starts)
            assert row["input_ids"][begin:end] == example["input_ids"]
            assert row["labels"][begin:end] == example["labels"]  # prompt masked per example
            assert pos[begin:end] == list(range(end - begin))
    batch = Collator(tokenizer.pad_token_id)(rows[:4])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    for i, row in enumerate(rows[:4]):
        n = len(row["input_ids"])
        assert batch["position_ids"][i, n:].tolist() == list(range(batch["input_ids"].shape[1] - n))
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()


def test_packed_rows_attend_per_example(tokenizer):
    """transformers builds a block-diagonal mask from restarting position_ids (use_cache=False)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    records = [
        {"prompt": "add(1,2)=", "response": "3"},
        {"prompt": "copy(abc)=", "response": "abc"},
    ]
    examples, _ = tokenize_records(records, tokenizer, max_length=64)
    batch = Collator(tokenizer.pad_token_id)(pack_examples(examples, max_length=64))
    assert batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        offset = 0
        for example in examples:
            alone = model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(
                packed[offset : offset + len(alone)], alone, rtol=1e-4, atol=1e-4
            )
            offset += len(alone)


def test_build_data_packing_and_sampler(tokenizer):
    bundle = build_data(
        DataConfig(num_train=300, num_eval=20, packing=True, max_length=64), tokenizer
    )
    assert bundle.packing and all(len(x["input_ids"]) <= 64 for x in bundle.train)
    assert sum(x["labels"].count(tokenizer.eos_token_id) for x in bundle.train) == 300
    assert all("position_ids" not in x for x in bundle.eval)  # eval is never packed
    sampler = bundle.train_batch_sampler(4)
    loader = torch.utils.data.DataLoader(
        bundle.train, batch_sampler=sampler, collate_fn=bundle.collate_fn
    )
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 4 and "position_ids" in batch


def test_batch_sampler_groups_lengths_and_splits_ranks():
    lengths = [((i * 37) % 50) + 1 for i in range(203)]
    per_rank = [
        list(TrainBatchSampler(lengths, 8, num_replicas=2, rank=r, seed=5, group=4)) for r in (0, 1)
    ]
    assert len(per_rank[0]) == len(per_rank[1])
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert len(seen) == len(set(seen))  # ranks never share an example
    spread = [
        max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in per_rank[0] if len(b) == 8
    ]
    assert sum(spread) / len(spread) < 10  # vs ~40 for random batches of lengths 1..50
    again = TrainBatchSampler(lengths, 8, num_replicas=2, rank=0, seed=5, group=4)
    assert list(again) == per_rank[0]
    again.set_epoch(1)
    assert list(again) != per_rank[0]
    dropped = TrainBatchSampler(lengths, 8, seed=5, drop_last=True)
    assert all(len(b) == 8 for b in dropped) and len(dropped) == len(list(dropped))


# ---------------------------------------------------------------- synthetic task


def test_synthetic_is_deterministic_and_splits_disjoint():
    for task in FINETUNE_TASKS:
        train, evals = finetune_splits(task, num_train=500, num_eval=100, seed=7)
        assert (train, evals) == finetune_splits(task, num_train=500, num_eval=100, seed=7)
        assert len(train) == 500 and len(evals) == 100
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
        assert len({r["prompt"] for r in train}) == 500
        assert finetune_splits(task, num_train=500, num_eval=100, seed=8) != (train, evals)
    assert pretrain_corpus(200, seed=1) == pretrain_corpus(200, seed=1)


def test_synthetic_answers_and_held_out_tasks():
    train, _ = finetune_splits("sub", num_train=50, num_eval=10)
    for record in train:
        a, b = map(int, record["prompt"][len("sub(") : -len(")=")].split(","))
        assert record["response"] == str(a - b) and a >= b >= 0
    sort_train, _ = finetune_splits("sort", num_train=20, num_eval=5)
    assert all(r["response"] == "".join(sorted(r["prompt"][5:-2])) for r in sort_train)
    shift_train, _ = finetune_splits("shift", num_train=20, num_eval=5)
    for r in shift_train:
        word = r["prompt"][len("shift(") : -2]
        assert r["response"] == "".join("a" if c == "z" else chr(ord(c) + 1) for c in word)
    corpus = pretrain_corpus(2000, seed=0)
    assert {r["prompt"].split("(")[0] for r in corpus} == set(PRETRAIN_TASKS)
    assert not set(PRETRAIN_TASKS) & set(FINETUNE_TASKS)
    assert max(len(r["prompt"]) + len(r["response"]) for r in corpus) < 40


def test_exact_match():
    assert exact_match(["3", " 4\n", "x"], ["3", "4", "y"]) == pytest.approx(2 / 3)
    assert exact_match([""], [""]) == 1.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no references"):
        exact_match([], [])


def test_generate_answers_batched_matches_single(tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    prompts = ["add(1,2)=", "copy(abcdef)=", "sub(57,3)="]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_answers(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single and all(isinstance(a, str) for a in batched)
    assert model.training  # training mode is restored


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "wiki"}, "name"),
        ({"name": "jsonl"}, "path"),
        ({"path": "x.jsonl"}, "path"),
        ({"name": "alpaca", "path": ""}, "path"),
        ({"task": "mul"}, "task"),
        ({"max_length": 4}, "max_length"),
        ({"max_length": 64.0}, "max_length"),
        ({"packing": "yes"}, "packing"),
        ({"num_train": 0}, "num_train"),
        ({"num_eval": True}, "num_eval"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"eval_fraction": 0}, "eval_fraction"),
        ({"max_records": 0}, "max_records"),
        ({"lang": ""}, "lang"),
        ({"seed": "0"}, "seed"),
    ],
)
def test_data_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"DataConfig\.{field}"):
        DataConfig(**kwargs)


def test_data_config_defaults_are_valid():
    cfg = DataConfig()
    assert cfg.name == "synthetic" and cfg.path is None and not cfg.packing
    with pytest.raises(AttributeError):
        cfg.seed = 1  # frozen
