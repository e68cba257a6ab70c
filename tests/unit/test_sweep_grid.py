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
    assert sweep.expand(["method.rank=8,16", "train.lr=0.1"]) == [
        ["method.rank=8", "train.lr=0.1"],
        ["method.rank=16", "train.lr=0.1"],
    ]


def test_commas_inside_brackets_braces_or_quotes_belong_to_the_value(sweep):
    one, two = (
        "[{path: a.jsonl, format: chat, weight: 3}]",
        "[{path: a.jsonl, format: chat}, {path: b, format: text}]",
    )
    assert sweep.expand([f"data.sources={one},{two}"]) == [
        [f"data.sources={one}"],
        [f"data.sources={two}"],
    ]
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


def test_points_whose_labels_would_collide_each_get_their_own_directory(sweep):
    """``[a,b]`` / ``[a, b]`` and ``/a/b`` / ``/a-b`` used to share one run directory: the second job
    of each pair wrote into the first one's run."""
    combos = sweep.expand(["data.sources=[a,b],[a, b]", "data.path=/a/b,/a-b", "method=lora"])
    labels = sweep.run_labels(combos)
    assert len(set(labels)) == len(combos) == 4
    base = "data.sources-a-b_data.path-a-b_method-lora"
    for combo, label in zip(combos, labels):  # the readable name, and a hash of the exact overrides
        assert label == f"{base}-{sweep._digest(combo, 8)}" and len(label) == len(base) + 9
    assert sweep.run_labels(combos) == labels  # deterministic
    distinct = sweep.run_labels([["method=lora"], ["method=falqon"]])
    assert distinct == ["method-lora", "method-falqon"]  # unchanged


def test_only_the_colliding_labels_get_a_hash_and_case_counts_as_a_collision(sweep):
    combos = [["method=LoRA"], ["method=lora"], ["method=falqon"]]  # one directory on macOS
    labels = sweep.run_labels(combos)
    assert (
        labels[2] == "method-falqon"
        and labels[0].startswith("method-LoRA-")
        and labels[1].startswith("method-lora-")
    )
    assert len({label.casefold() for label in labels}) == 3


def test_no_label_escapes_or_hides_and_a_repeated_point_is_refused(sweep):
    for combo in (["=.."], ["=."], ["x=..."], ["..=..."]):
        label = sweep.run_label(combo)
        assert (
            label not in (".", "..", "") and not label.startswith((".", "-")) and "/" not in label
        ), (combo, label)
    with pytest.raises(SystemExit, match="appears twice"):
        sweep.run_labels(sweep.expand(["train.lr=0.1,0.1"]))
