"""data=text as practitioners bring it: ``sample_by`` (document / paragraph / line) and one corpus
file, whose eval set is a held-out share of its tokenized windows."""

from __future__ import annotations

from pathlib import Path

import pytest

from falqon_dist.config_checks import InvalidField
from falqon_dist.data import DataConfig, DataFormatError, build_data, load_split_records
from falqon_dist.data.sources import split_text
from falqon_dist.data.tokenization import tokenize_text
from falqon_dist.models.tokenizer import build_tiny_tokenizer

CORPUS = (
    "In the beginning was the word.\n"
    "And the word was short.\n"
    "\n"
    "   \n"
    "A second paragraph,\n"
    "over two lines.\n"
    "\n\n\n"
    "The third.\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_split_text_by_document_paragraph_and_line():
    assert split_text(CORPUS, "document", "c.txt") == ([{"text": CORPUS}], ["c.txt"])
    rows, wheres = split_text(CORPUS, "paragraph", "c.txt")
    assert [row["text"] for row in rows] == [
        "In the beginning was the word.\nAnd the word was short.",
        "A second paragraph,\nover two lines.",
        "The third.",
    ]
    assert wheres == ["c.txt: paragraph 1", "c.txt: paragraph 2", "c.txt: paragraph 3"]
    rows, wheres = split_text(CORPUS, "line", "c.txt")
    assert [row["text"] for row in rows] == [
        "In the beginning was the word.",
        "And the word was short.",
        "A second paragraph,",
        "over two lines.",
        "The third.",
    ]
    assert wheres == [
        "c.txt: line 1",
        "c.txt: line 2",
        "c.txt: line 5",
        "c.txt: line 6",
        "c.txt: line 10",
    ]
    assert split_text(" \n\n", "line", "e.txt") == ([], []) == split_text("\n", "document", "e.txt")


def test_one_text_file_by_line_or_paragraph_splits_its_records(tmp_path: Path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line number {i}" for i in range(40)) + "\n")
    train, evals = load_split_records(
        DataConfig(name="text", path=str(corpus), sample_by="line", eval_fraction=0.1)
    )
    assert len(train) == 36 and len(evals) == 4
    assert sorted(r["text"] for r in train + evals) == sorted(f"line number {i}" for i in range(40))
    corpus.write_text("\n\n".join(f"paragraph {i}\nof two lines" for i in range(20)))
    train, evals = load_split_records(
        DataConfig(name="text", path=str(corpus), sample_by="paragraph", eval_fraction=0.1)
    )
    assert (
        len(train) == 18 and len(evals) == 2 and all("\nof two lines" in r["text"] for r in evals)
    )


def test_one_text_file_by_document_holds_out_disjoint_windows(tmp_path: Path, tokenizer):
    text = "".join(f"verse {i}: and it was so. " for i in range(200))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    cfg = DataConfig(name="text", path=str(corpus), max_length=64, packing=False, eval_fraction=0.1)
    train, evals = load_split_records(cfg)
    assert train == [{"text": text}] and evals == []  # one document: the windows are split instead
    bundle = build_data(cfg, tokenizer)
    windows = [tuple(w["input_ids"]) for w in tokenize_text(text, tokenizer, 64)]
    held_out = [tuple(e["input_ids"]) for e in bundle.eval.examples]
    trained = [tuple(e["input_ids"]) for e in bundle.train.examples]
    assert len(held_out) == round(len(windows) * 0.1) and len(held_out) + len(trained) == len(
        windows
    )
    assert sorted(held_out + trained) == sorted(windows) and not set(held_out) & set(trained)
    assert [r["text"] for r in bundle.eval_records] == [tokenizer.decode(list(w)) for w in held_out]
    packed = build_data(DataConfig(**{**cfg.__dict__, "packing": True}), tokenizer)
    assert packed.eval.examples == bundle.eval.examples  # held out before packing: same windows
    packed_tokens = sum(len(e["input_ids"]) for e in packed.train.examples)
    assert packed_tokens == sum(len(w) for w in trained)
    again = build_data(cfg, tokenizer)
    assert again.eval.examples == bundle.eval.examples  # seeded
    other = build_data(DataConfig(**{**cfg.__dict__, "seed": 1}), tokenizer)
    assert other.eval.examples != bundle.eval.examples


def test_enough_documents_split_by_document_as_before(tmp_path: Path):
    for i in range(20):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 5)
    train, evals = load_split_records(DataConfig(name="text", path=str(tmp_path)))
    assert len(train) == 19 and len(evals) == 1  # 20 x 0.05 = 1 document held out


def test_a_text_too_short_for_two_windows_names_the_file(tmp_path: Path, tokenizer):
    corpus = tmp_path / "short.txt"
    corpus.write_text("tiny")
    with pytest.raises(DataFormatError, match=r"short\.txt \(its windows\): need at least 2"):
        build_data(DataConfig(name="text", path=str(corpus), max_length=64), tokenizer)


def test_sample_by_is_checked_and_only_read_by_text():
    with pytest.raises(InvalidField, match="sample_by") as info:
        DataConfig(name="text", path="x.txt", sample_by="sentence")
    assert info.value.field == "sample_by" and "paragraph" in str(info.value)
    with pytest.raises(InvalidField, match="only by name='text'"):
        DataConfig(name="jsonl", path="x.jsonl", sample_by="line")
    assert DataConfig(name="text", path="x.txt", sample_by="line").sample_by == "line"


def test_a_mixture_refuses_a_single_document_text_source(tmp_path: Path):
    (tmp_path / "book.txt").write_text("one long book\n" * 50)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"prompt": "q{i}", "response": "a{i}"}}\n' for i in range(40)))
    sources = [
        {"path": str(tmp_path / "book.txt"), "format": "text"},
        {"path": str(rows), "format": "jsonl"},
    ]
    with pytest.raises(DataFormatError, match=r"book: .*sample_by=paragraph or line"):
        load_split_records(DataConfig(name="mix", sources=sources))
    train, evals = load_split_records(DataConfig(name="mix", sources=sources, sample_by="line"))
    assert any("text" in r for r in train) and evals
