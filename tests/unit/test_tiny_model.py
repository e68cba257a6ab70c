"""The embedded tiny base model: architecture, locked/atomic/cached build, and the real pretrained build.

The last tests build the real model once into the default cache ($FALQON_CACHE or
~/.cache/falqon_dist), so later runs (and the rest of the test suite) reuse it.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import falqon_dist as fd
from falqon_dist.data import mean_response_loss
from falqon_dist.data.collate import Collator
from falqon_dist.data.synthetic import pretrain_corpus
from falqon_dist.data.tokenization import TokenizedDataset, tokenize_records
from falqon_dist.models import tiny
from falqon_dist.models.tokenizer import build_tiny_tokenizer


def test_tiny_config_is_fp8_friendly():
    cfg = tiny.tiny_config()
    assert cfg.hidden_size % 16 == 0 and cfg.intermediate_size % 16 == 0 and cfg.vocab_size % 16 == 0
    assert cfg.vocab_size >= len(build_tiny_tokenizer())
    model = LlamaForCausalLM(cfg)
    converted = fd.convert_model(model, fd.FalqonConfig(rank=16, backend="emulated"))
    assert len(converted) == 7 * cfg.num_hidden_layers and "lm_head" not in converted


def test_tokenizer_round_trip_and_specials():
    tokenizer = build_tiny_tokenizer()
    for text in ("sub(57,23)=34", "copy(kitep)=kitep", "Hello, World!\n\tünïcödé 日本"):
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer("0123456789", add_special_tokens=False)["input_ids"]) == 10  # one token per digit
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


@pytest.fixture
def fake_build(monkeypatch):
    """Replace the expensive pretraining build with a quick fake that counts its calls."""
    calls = []

    def build_into(directory, settings, pretrain_anew=False):
        calls.append(directory)
        time.sleep(0.3)  # long enough for a second caller to hit the lock
        (directory / "weights.txt").write_text(str(len(calls)))
        (directory / tiny.BUILD_INFO).write_text(json.dumps({"recipe": tiny.recipe_fingerprint(settings)}))
        return {}

    monkeypatch.setattr(tiny, "_build_into", build_into)
    return calls


def test_concurrent_builds_share_one_build(tmp_path, fake_build):
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(tiny.build_tiny_model(tmp_path))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake_build) == 1
    assert paths == [tmp_path / tiny.TINY_NAME] * 3
    assert tiny.build_tiny_model(tmp_path) == paths[0] and len(fake_build) == 1  # cached
    # Only the model and its lock file remain: the staging directory was moved into place.
    assert sorted(p.name for p in tmp_path.iterdir()) == [tiny.TINY_NAME, f"{tiny.TINY_NAME}.lock"]


def test_force_rebuilds_atomically(tmp_path, fake_build):
    path = tiny.build_tiny_model(tmp_path)
    assert tiny.build_tiny_model(tmp_path, force=True) == path
    assert len(fake_build) == 2 and (path / "weights.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [tiny.TINY_NAME, f"{tiny.TINY_NAME}.lock"]


def test_stale_recipe_or_incomplete_dir_is_rebuilt(tmp_path, fake_build):
    target = tmp_path / tiny.TINY_NAME
    target.mkdir()
    (target / "config.json").write_text("{}")  # an incomplete directory (no build info)
    assert tiny.build_tiny_model(tmp_path) == target and len(fake_build) == 1
    (target / tiny.BUILD_INFO).write_text(json.dumps({"recipe": "from-an-older-recipe"}))
    assert tiny.build_tiny_model(tmp_path) == target and len(fake_build) == 2
    assert tiny.build_tiny_model(tmp_path) == target and len(fake_build) == 2


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(directory, settings, pretrain_anew=False):
        (directory / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny, "_build_into", broken)
    with pytest.raises(RuntimeError, match="boom"):
        tiny.build_tiny_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"{tiny.TINY_NAME}.lock"]


def test_cache_dir_from_environment(tmp_path, monkeypatch, fake_build):
    monkeypatch.setenv("FALQON_CACHE", str(tmp_path / "cache"))
    assert tiny.default_cache_dir() == tmp_path / "cache"
    assert tiny.build_tiny_model() == tmp_path / "cache" / tiny.TINY_NAME


# ---------------------------------------------------------------- the real build (slow on first run)


@pytest.fixture(scope="module")
def tiny_path():
    return tiny.build_tiny_model()


def _pretrain_loss(model, tokenizer) -> float:
    examples, _ = tokenize_records(pretrain_corpus(200, seed=12345), tokenizer, 64)
    return mean_response_loss(model, TokenizedDataset(examples), Collator(tokenizer.pad_token_id))


@pytest.mark.slow
def test_built_model_loads_and_learned_pretraining_tasks(tiny_path):
    info = json.loads((tiny_path / tiny.BUILD_INFO).read_text())
    assert info["name"] == tiny.TINY_NAME
    assert (tiny_path / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    assert isinstance(model, LlamaForCausalLM)
    text = "rev(kitep)=petik"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer.eos_token_id == model.config.eos_token_id == 2
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(tiny.tiny_config())
    trained_loss, untrained_loss = _pretrain_loss(model, tokenizer), _pretrain_loss(untrained, tokenizer)
    assert trained_loss < 0.5 * untrained_loss, (trained_loss, untrained_loss)


@pytest.mark.slow
def test_second_build_reuses_cache(tiny_path):
    stamp = (tiny_path / tiny.BUILD_INFO).stat().st_mtime_ns
    start = time.perf_counter()
    assert tiny.build_tiny_model() == tiny_path
    assert time.perf_counter() - start < 1.0
    assert (tiny_path / tiny.BUILD_INFO).stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- shipped weights and the recipe itself


def test_shipped_weights_match_the_current_recipe():
    """Change the recipe and this fails: regenerate with ``python -m falqon_dist.models.tiny --regenerate``."""
    info = json.loads((tiny.SHIPPED_DIR / tiny.BUILD_INFO).read_text())
    assert info["recipe"] == tiny.recipe_fingerprint(tiny.PretrainSettings()), "shipped tiny weights are stale"
    assert (tiny.SHIPPED_DIR / "model.safetensors").stat().st_size < 4 * 2**20
    model = AutoModelForCausalLM.from_pretrained(tiny.SHIPPED_DIR)
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]


def test_a_build_copies_the_shipped_bytes(tmp_path):
    path = tiny.build_tiny_model(tmp_path)
    assert (path / "model.safetensors").read_bytes() == (tiny.SHIPPED_DIR / "model.safetensors").read_bytes()


def test_the_pretraining_recipe_still_runs_and_learns(tmp_path):
    """What ``--regenerate`` and ``pretrain_anew`` run, shortened to 40 steps."""
    info = tiny._pretrain_into(tmp_path, tiny.PretrainSettings(steps=40, warmup=4))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(tiny.tiny_config())
    assert _pretrain_loss(model, tokenizer) < _pretrain_loss(untrained, tokenizer)
    assert info["pretrain"]["steps"] == 40
