"""The embedded tiny base model: architecture, loaded straight from the package (files checked), the recipe."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import falqon_dist as fd
from falqon_dist.data import mean_response_loss
from falqon_dist.data.collate import Collator
from falqon_dist.data.synthetic import pretrain_corpus
from falqon_dist.data.tokenization import TokenizedDataset, tokenize_records
from falqon_dist.models import pretrain, tiny
from falqon_dist.models.tokenizer import build_tiny_tokenizer


def test_tiny_config_is_fp8_friendly():
    cfg = tiny.tiny_config()
    assert (
        cfg.hidden_size % 16 == 0 and cfg.intermediate_size % 16 == 0 and cfg.vocab_size % 16 == 0
    )
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
    assert (
        len(tokenizer("0123456789", add_special_tokens=False)["input_ids"]) == 10
    )  # one token per digit
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_the_model_loads_straight_from_the_package(tmp_path, monkeypatch):
    """No cache, no copy: the returned directory is the package's, and nothing is written anywhere."""
    monkeypatch.setenv("FALQON_CACHE", str(tmp_path / "cache"))
    before = {p.name: p.stat().st_mtime_ns for p in tiny.SHIPPED_DIR.iterdir()}
    assert tiny.build_tiny_model() == tiny.SHIPPED_DIR
    assert not (tmp_path / "cache").exists()
    assert {p.name: p.stat().st_mtime_ns for p in tiny.SHIPPED_DIR.iterdir()} == before
    info = json.loads((tiny.SHIPPED_DIR / tiny.BUILD_INFO).read_text())
    shipped = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert set(info["files"]) == shipped


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch):
    """A copy of the shipped build standing in for the package's."""
    copy = tmp_path / "tiny_weights"
    shutil.copytree(tiny.SHIPPED_DIR, copy)
    monkeypatch.setattr(tiny, "SHIPPED_DIR", copy)
    return copy


def test_a_changed_or_missing_shipped_file_is_named(shipped_copy):
    assert tiny.build_tiny_model() == shipped_copy
    weights = shipped_copy / "model.safetensors"
    weights.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
    )  # what a checkout without LFS holds
    with pytest.raises(
        tiny.TinyModelError, match=rf"^{weights}: SHA-256 .* differs from the build's .*regenerate"
    ):
        tiny.build_tiny_model()
    weights.unlink()
    with pytest.raises(tiny.TinyModelError, match=rf"^{weights}: missing from the tiny model"):
        tiny.build_tiny_model()
    (shipped_copy / tiny.BUILD_INFO).write_text("{}")
    with pytest.raises(tiny.TinyModelError, match=r"unreadable build record \(KeyError"):
        tiny.build_tiny_model()


# ---------------------------------------------------------------- the shipped model (what every run fine-tunes)


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
    trained_loss, untrained_loss = (
        _pretrain_loss(model, tokenizer),
        _pretrain_loss(untrained, tokenizer),
    )
    assert trained_loss < 0.5 * untrained_loss, (trained_loss, untrained_loss)


# ---------------------------------------------------------------- shipped weights and the recipe itself


def test_shipped_weights_match_the_current_recipe():
    """Change the recipe and this fails: regenerate with ``python -m falqon_dist.models.tiny --regenerate``."""
    info = json.loads((tiny.SHIPPED_DIR / tiny.BUILD_INFO).read_text())
    assert info["recipe"] == pretrain.recipe_fingerprint(pretrain.PretrainSettings()), (
        "shipped tiny weights are stale"
    )
    assert (tiny.SHIPPED_DIR / "model.safetensors").stat().st_size < 4 * 2**20
    model = AutoModelForCausalLM.from_pretrained(tiny.SHIPPED_DIR)
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]


def test_the_pretraining_recipe_still_runs_and_learns(tmp_path):
    """What ``--regenerate`` runs, shortened to 40 steps; its build record checks."""
    info = pretrain.pretrain_into(tmp_path, pretrain.PretrainSettings(steps=40, warmup=4))
    assert tiny.check_build(tmp_path) == info and "model.safetensors" in info["files"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(tiny.tiny_config())
    assert _pretrain_loss(model, tokenizer) < _pretrain_loss(untrained, tokenizer)
    assert info["pretrain"]["steps"] == 40
