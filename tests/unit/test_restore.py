"""The run restore's skeleton: built on the meta device (no base weight read), filled from the checkpoint state.

A restored model must compute what the trained model computed: same parameters and persistent
buffers (from the state), same non-persistent buffers (rotary ``inv_freq``, which no checkpoint
holds: computed at construction), hence equal logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from falqon_dist.method import convert_model, falqon_layers
from falqon_dist.models import build_tiny_model
from falqon_dist.train.model_setup import TORCH_DTYPES, layer_filter
from falqon_dist.train.restore import (
    META,
    RestoreError,
    build_falqon_skeleton,
    load_into,
    parameters_on_meta,
)
from falqon_dist.train.saved_config import validate_saved_config

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def settings():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["run.dir=/tmp/falqon-test-run", "method.rank=8"]
        )
    return validate_saved_config(yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True)), "test")


@pytest.fixture(scope="module")
def trained(settings):
    """The tiny model converted as training converts it, with a live adapter term (B ≠ 0)."""
    path = str(build_tiny_model())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[settings.model.dtype])
    convert_model(model, settings.method.config, module_filter_fn=layer_filter(settings))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in falqon_layers(model):
            layer.B.copy_(0.01 * torch.randn(layer.B.shape, generator=generator).to(layer.B.dtype))
    return path, model.eval()


def test_parameters_on_meta_keeps_buffers_real():
    with parameters_on_meta():
        linear = torch.nn.Linear(4, 3)
        norm = torch.nn.BatchNorm1d(3)
    assert (
        linear.weight.device == META and linear.bias.device == META and norm.weight.device == META
    )
    assert norm.running_mean.device.type == "cpu"
    assert torch.nn.Linear(4, 3).weight.device.type == "cpu"  # the patch is gone afterwards


def test_the_skeleton_reads_no_base_weight(settings, trained, monkeypatch):
    path, _ = trained

    def refuse(*args, **kwargs):
        raise AssertionError("the restore skeleton must not load the base weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    skeleton = build_falqon_skeleton(path, settings)
    assert all(p.device == META for p in skeleton.parameters())
    assert len(falqon_layers(skeleton)) == len(falqon_layers(trained[1])) > 0


def test_a_restored_model_computes_the_trained_logits(settings, trained):
    path, model = trained
    state = {key: value.clone() for key, value in model.state_dict().items()}
    restored = build_falqon_skeleton(path, settings)
    load_into(restored, state, Path("checkpoint"))
    restored.eval()
    ours, theirs = dict(restored.named_buffers()), dict(model.named_buffers())
    assert ours.keys() == theirs.keys() and any("inv_freq" in key for key in ours)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key  # the non-persistent rotary tables too
    for (name, layer), (_, reference) in zip(
        falqon_layers(restored), falqon_layers(model), strict=True
    ):
        assert (
            torch.equal(layer.qweight, reference.qweight) and layer.qweight.dtype == torch.uint8
        ), name
    ids = torch.randint(
        3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        assert torch.equal(restored(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_state_that_does_not_fit_is_named(settings, trained):
    path, model = trained
    state = dict(model.state_dict())
    key = next(k for k in state if k.endswith(".qweight"))
    with pytest.raises(RestoreError, match=rf"{key} has dtype torch.float32"):
        load_into(
            build_falqon_skeleton(path, settings), {**state, key: state[key].float()}, Path("ckpt")
        )
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(
        RestoreError, match=rf"(?s)^ckpt does not match the model rebuilt from config.yaml: .*{key}"
    ):
        load_into(build_falqon_skeleton(path, settings), missing, Path("ckpt"))
