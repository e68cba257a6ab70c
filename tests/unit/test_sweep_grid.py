"""launch/sweep.py's grid: axes expand to every combination, list values keep their commas."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SWEEP = Path(__file__).resolve().parents[2] / "launch" / "sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("falqon_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_axes_expand_to_every_combination(sweep):
    assert sweep.expand(["method.rank=8,16", "train.lr=0.1"]) == [["method.rank=8", "train.lr=0.1"],
                                                                  ["method.rank=16", "train.lr=0.1"]]  # fmt: skip


def test_commas_inside_brackets_braces_or_quotes_belong_to_the_value(sweep):
    one, two = "[{path: a.jsonl, format: chat, weight: 3}]", "[{path: a.jsonl, format: chat}, {path: b, format: text}]"
    assert sweep.expand([f"data.sources={one},{two}"]) == [[f"data.sources={one}"], [f"data.sources={two}"]]
    assert sweep.split_values("'a,b',[1,2],3") == ["'a,b'", "[1,2]", "3"]
    with pytest.raises(SystemExit, match="unbalanced"):
        sweep.split_values("[a,b")
    with pytest.raises(SystemExit, match="key=v1,v2"):
        sweep.expand(["method.rank"])


def test_run_labels_are_safe_directory_names(sweep):
    assert sweep.run_label(["method.rank=8", "train.lr=0.1"]) == "method.rank-8_train.lr-0.1"
    label = sweep.run_label(["data.sources=[{path: /data/chat.jsonl, format: chat, weight: 3}]"])
    assert label == "data.sources-path-data-chat.jsonl-format-chat-weight-3"
    long = [f"data.sources=[{{path: /data/{'x' * 200}.jsonl, format: chat}}]"]
    other = [f"data.sources=[{{path: /data/{'x' * 200}.jsonl, format: text}}]"]
    assert len(sweep.run_label(long)) <= 100 and sweep.run_label(long) != sweep.run_label(other)
