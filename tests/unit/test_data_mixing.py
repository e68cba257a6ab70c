"""data=mix: several datasets mixed by weight, reproducibly, the same in every process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from falqon_dist.data import DataConfig, DataFormatError, DataSource, build_data, load_split_records
from falqon_dist.data.mixing import apportion, interleave, mix, sample
from falqon_dist.models.tokenizer import build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _sources(root: Path) -> dict[str, str]:
    """Three small datasets of three formats whose records say where they came from."""
    pairs = _write(
        root / "pairs.jsonl", [{"prompt": f"pair {i}?", "response": f"p{i}"} for i in range(40)]
    )
    chats = _write(
        root / "chats.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"chat {i}?"},
                    {"role": "assistant", "content": f"c{i}"},
                ]
            }
            for i in range(10)
        ],
    )
    docs = root / "docs"
    docs.mkdir()
    for i in range(20):
        (docs / f"doc{i:02d}.txt").write_text(f"document {i} text")
    return {"pairs": pairs, "chats": chats, "docs": str(docs)}


def _origin(record: dict) -> str:
    if "messages" in record:
        return "chats"
    return "docs" if "text" in record else "pairs"


def _mix_config(paths: dict[str, str], weights: dict[str, float], **kwargs) -> DataConfig:
    formats = {"pairs": "jsonl", "chats": "chat", "docs": "text"}
    sources = [
        {"path": paths[name], "format": formats[name], "weight": weight}
        for name, weight in weights.items()
    ]
    return DataConfig(name="mix", sources=sources, eval_fraction=0.1, **kwargs)


# ------------------------------------------------------------------------------------------- the arithmetic
@pytest.mark.parametrize(
    "total, weights, expected",
    [
        (70, [1, 1, 1], [24, 23, 23]),  # ties go to the earlier source
        (10, [2, 1, 1, 1], [4, 2, 2, 2]),
        (7, [0.5, 0.25, 0.25], [3, 2, 2]),  # 3.5, 1.75, 1.75: the larger remainders round up
        (3, [100, 1], [3, 0]),
    ],
)
def test_apportion_is_proportional_and_exact(total, weights, expected):
    assert apportion(total, weights) == expected and sum(expected) == total


def test_apportion_refuses_non_positive_weights():
    with pytest.raises(ValueError, match="positive"):
        apportion(10, [1, 0])


def test_sample_repeats_whole_passes_then_draws_distinct_records():
    import random

    drawn = sample(list(range(5)), 13, random.Random(0))
    counts = Counter(drawn)
    assert len(drawn) == 13 and set(counts) <= set(range(5))
    assert sorted(counts.values()) == [2, 2, 3, 3, 3]  # two full passes, then 3 distinct extras
    assert sorted(sample(list(range(5)), 3, random.Random(0))) != list(range(5))  # sampled down
    assert len(set(sample(list(range(5)), 3, random.Random(0)))) == 3


def test_interleave_takes_one_of_each_in_turn():
    assert interleave([[1, 2, 3], ["a"], [10, 20]]) == [1, "a", 10, 2, 20, 3]


def test_mix_counts_and_seed():
    parts = [[("a", i) for i in range(30)], [("b", i) for i in range(10)]]
    mixed, counts = mix(parts, [1, 3], seed=0)
    assert counts == [10, 30] and Counter(name for name, _ in mixed) == {"a": 10, "b": 30}
    assert mix(parts, [1, 3], seed=0)[0] == mixed  # reproducible
    assert mix(parts, [1, 3], seed=1)[0] != mixed  # and the seed matters
    assert [name for name, _ in mixed[:10]] != ["a"] * 10  # shuffled, not source after source


# ------------------------------------------------------------------------------------------- the data side
def test_weights_set_the_share_of_each_source(tmp_path):
    paths = _sources(tmp_path)
    train, evals = load_split_records(_mix_config(paths, {"pairs": 1, "chats": 2, "docs": 1}))
    # train records before mixing: pairs 36, chats 9, docs 18 = 63; 1:2:1 of 63 = 15.75, 31.5, 15.75
    assert Counter(_origin(r) for r in train) == {"pairs": 16, "chats": 31, "docs": 16}
    # sampled down: no repeats
    assert len({json.dumps(r) for r in train if _origin(r) == "pairs"}) == 16
    # repeated: every chat is there
    assert len({json.dumps(r) for r in train if _origin(r) == "chats"}) == 9
    # eval interleaved: every source early
    assert [_origin(r) for r in evals[:3]] == ["pairs", "chats", "docs"]
    assert Counter(_origin(r) for r in evals) == {"pairs": 4, "chats": 1, "docs": 2}
    train_records = {json.dumps(r) for r in train}
    assert not any(json.dumps(r) in train_records for r in evals)  # each source's split holds


def test_equal_weights_keep_every_record_once(tmp_path):
    paths = _sources(tmp_path)
    mixed, _ = load_split_records(_mix_config(paths, {"pairs": 1, "docs": 1}, max_records=12))
    # max_records: per source
    assert Counter(_origin(r) for r in mixed) == {"pairs": 12, "docs": 12}
    assert len({json.dumps(r) for r in mixed}) == 24


def test_build_data_reports_what_each_source_gave(tmp_path):
    paths = _sources(tmp_path)
    bundle = build_data(
        _mix_config(paths, {"pairs": 1, "chats": 2, "docs": 1}, max_length=64),
        build_tiny_tokenizer(),
    )
    shares = {share.format: share for share in bundle.mixture}
    assert (shares["chat"].available, shares["chat"].taken, shares["chat"].weight) == (9, 31, 2)
    assert (
        shares["chat"]
        .describe()
        .startswith(f"chats = {paths['chats']} (chat, weight 2): 31 train records from 9 (x3.44)")
    )
    assert len(bundle.train) > 0 and len(bundle.eval) == 7
    # file / directory names
    assert [share.name for share in bundle.mixture] == ["pairs", "chats", "docs"]
    # every eval row knows its source, interleaved
    assert bundle.eval_groups == (0, 1, 2, 0, 2, 0, 0)
    plain = build_data(DataConfig(), build_tiny_tokenizer())
    assert not plain.mixture and not plain.eval_groups


def test_per_source_eval_loss_comes_from_the_same_forward_passes(tmp_path):
    """Grouped sums add up to the overall loss, and each group's loss is that of its rows alone."""
    import torch
    from transformers import LlamaForCausalLM

    from falqon_dist.data import TokenizedDataset
    from falqon_dist.data.generation import mean_response_loss
    from falqon_dist.models.tiny import tiny_config
    from falqon_dist.train.evaluate import response_losses

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    paths = _sources(tmp_path)
    bundle = build_data(
        _mix_config(paths, {"pairs": 1, "chats": 2, "docs": 1}, max_length=64),
        build_tiny_tokenizer(),
    )
    overall, per_source = response_losses(
        model,
        bundle.eval,
        bundle.collate_fn,
        100,
        batch_size=3,
        groups=bundle.eval_groups,
        num_groups=3,
    )
    assert overall == pytest.approx(
        mean_response_loss(model, bundle.eval, bundle.collate_fn), rel=1e-6
    )
    for index, loss in enumerate(per_source):
        rows = TokenizedDataset(
            [bundle.eval[i] for i, g in enumerate(bundle.eval_groups) if g == index]
        )
        assert loss == pytest.approx(mean_response_loss(model, rows, bundle.collate_fn), rel=1e-6)
    first_two = response_losses(
        model,
        bundle.eval,
        bundle.collate_fn,
        2,
        batch_size=3,
        groups=bundle.eval_groups,
        num_groups=3,
    )[1]
    # a source with no row evaluated has no loss
    assert first_two[2] is None and first_two[0] is not None


def test_source_names_default_to_file_names_and_stay_distinct():
    from falqon_dist.data.config import source_names

    cfg = DataConfig(
        name="mix",
        sources=[
            {"path": "/a/train.jsonl", "format": "chat"},
            {"path": "/b/train.jsonl", "format": "chat"},
            {"path": "docs/", "format": "text"},
            {"path": "x.txt", "format": "text", "name": "docs"},
        ],
    )
    assert source_names(cfg.sources) == ("train_0", "train_1", "docs_2", "docs")
    with pytest.raises(ValueError, match="same name twice"):
        DataConfig(
            name="mix",
            sources=[
                {"path": "a", "format": "chat", "name": "n"},
                {"path": "b", "format": "chat", "name": "n"},
            ],
        )
    with pytest.raises(ValueError, match=r"sources\[0\]\.name"):
        DataConfig(name="mix", sources=[{"path": "a", "format": "chat", "name": "has space"}])


_FINGERPRINT = """
import hashlib, json, sys
from falqon_dist.data import DataConfig, load_split_records
cfg = DataConfig(**json.loads(sys.argv[1]))
train, evals = load_split_records(cfg)
print(hashlib.sha256(json.dumps([train, evals], sort_keys=True).encode()).hexdigest())
"""


def test_every_process_builds_the_same_mixture(tmp_path):
    """Ranks are separate processes: the mixture may not depend on hash seeds or global RNG state."""
    paths = _sources(tmp_path)
    cfg = {
        "name": "mix",
        "seed": 3,
        "sources": [
            {"path": paths["pairs"], "format": "jsonl", "weight": 0.5},
            {"path": paths["chats"], "format": "chat", "weight": 1.5},
            {"path": paths["docs"], "format": "text"},
        ],
    }
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", _FINGERPRINT, json.dumps(cfg)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        digests.add(out.stdout.strip().splitlines()[-1])
    assert len(digests) == 1


def test_a_malformed_row_in_one_source_names_its_file_and_line(tmp_path):
    paths = _sources(tmp_path)
    bad = tmp_path / "bad_chats.jsonl"
    bad.write_text(
        Path(paths["chats"]).read_text() + '{"messages": [{"role": "robot", "content": "x"}]}\n'
    )
    with pytest.raises(DataFormatError, match=rf"{bad}: line 11"):
        load_split_records(
            DataConfig(
                name="mix",
                sources=[
                    {"path": paths["pairs"], "format": "jsonl"},
                    {"path": str(bad), "format": "chat"},
                ],
            )
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "mix"}, r"DataConfig\.sources is required"),
        (
            {"name": "mix", "sources": [{"path": "a", "format": "chat"}], "path": "b"},
            r"DataConfig\.path must be None",
        ),
        (
            {"name": "jsonl", "path": "a", "sources": [{"path": "a", "format": "chat"}]},
            r"DataConfig\.sources is only",
        ),
        (
            {"name": "mix", "sources": [{"path": "a", "format": "synthetic"}]},
            r"DataConfig\.sources\[0\]\.format",
        ),
        (
            {"name": "mix", "sources": [{"path": "a", "format": "chat", "weight": -1}]},
            r"DataConfig\.sources\[0\]\.weight",
        ),
        (
            {
                "name": "mix",
                "sources": [{"path": "a", "format": "chat"}, {"path": "", "format": "chat"}],
            },
            r"DataConfig\.sources\[1\]\.path",
        ),
        (
            {"name": "mix", "sources": [{"path": "a", "format": "chat", "share": 2}]},
            r"sources\[0\] has unknown key",
        ),
        ({"name": "mix", "sources": [{"path": "a"}]}, r"sources\[0\] needs 'format'"),
        ({"name": "mix", "sources": ["a.jsonl"]}, r"sources\[0\] must be a mapping"),
    ],
)
def test_mix_config_errors_name_the_source_and_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


def test_sources_become_data_sources():
    cfg = DataConfig(
        name="mix",
        sources=[
            {"path": ["a", "b"], "format": "text", "weight": 2},
            DataSource(path="c", format="chat"),
        ],
    )
    assert cfg.sources == (
        DataSource(path=("a", "b"), format="text", weight=2),
        DataSource(path="c", format="chat"),
    )
