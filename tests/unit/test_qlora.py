"""QLoRA (bitsandbytes NF4 backbone + peft LoRA) on CPU: conversion, numerics, adapters, checkpoints, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from falqon_dist.baselines import (
    LoraConfig,
    QloraConfig,
    apply_lora,
    apply_qlora,
    target_module_names,
)
from falqon_dist.fp8 import sqnr_db
from falqon_dist.methods import prepare_model
from tests.models import tiny_llama

# NF4 keeps 16 levels per 64-block: on Gaussian weights (std 0.02, no bias) the layer output's error
# against the float layer is 9.1% relative (SQNR 20.8 dB) in fp32 and bf16, with or without double
# quantization (bitsandbytes 0.50.2, CPU). The bounds leave room for other kernels and versions,
# and the lower one proves the weight really is quantized.
REL_ERR_MAX = 0.12
REL_ERR_MIN = 0.03


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


def _gaussian_linear(dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 128, bias=False)).to(dtype)
    with torch.no_grad():
        model[0].weight.normal_(0.0, 0.02)
    return model


def _lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


# ---------------------------------------------------------------------------------------------------
# conversion


def test_converts_exactly_the_falqon_targets_and_trains_only_adapters(bnb) -> None:
    model = tiny_llama(torch.bfloat16)
    expected = target_module_names(model)
    embed_before = model.model.embed_tokens.weight.detach().clone()
    names = apply_qlora(model, QloraConfig(rank=4))
    assert names == expected and len(names) == 14 and "lm_head" not in names
    for name in names:
        wrapper = model.get_submodule(name)
        base = wrapper.base_layer
        assert type(base) is bnb.nn.Linear4bit, name
        weight = base.weight
        assert (
            isinstance(weight, bnb.nn.Params4bit)
            and weight.dtype == torch.uint8
            and not weight.requires_grad
        )
        # double quantization by default
        assert weight.quant_type == "nf4" and weight.quant_state.nested
        assert weight.numel() * 2 == base.in_features * base.out_features  # two NF4 codes per byte
        assert base.compute_dtype == torch.bfloat16
    # everything else is untouched: lm_head stays a float nn.Linear, the embedding keeps its values
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.embed_tokens.weight, embed_before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.default.weight" for n in names for ab in "AB"}
    assert {p.dtype for p in _lora_params(model).values()} == {torch.bfloat16}  # the compute dtype


def test_nf4_output_is_close_to_the_float_layer(bnb) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for double_quant in (True, False):
            model = _gaussian_linear(dtype)
            weight_hp = model[0].weight.detach().double().clone()
            apply_qlora(model, QloraConfig(rank=8, double_quant=double_quant), target_modules=["0"])
            x = torch.randn(64, 256, dtype=dtype)
            with torch.no_grad():
                y = model(x).double()
            y_ref = x.double() @ weight_hp.T
            rel = ((y - y_ref).norm() / y_ref.norm()).item()
            assert REL_ERR_MIN < rel < REL_ERR_MAX, (dtype, double_quant, rel, sqnr_db(y_ref, y))
            # and it is exactly "dequantize, then matmul in the compute dtype" (B = 0 at the start)
            base = model[0].base_layer
            w_deq = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(
                dtype
            )
            torch.testing.assert_close(model(x), x @ w_deq.T, rtol=0, atol=0)


def test_bias_is_kept_frozen(bnb) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64, bias=True))
    bias = model[0].bias
    apply_qlora(model, QloraConfig(rank=4), target_modules=["0"])
    base = model[0].base_layer
    assert base.bias is bias and not bias.requires_grad
    x = torch.randn(8, 128)
    w_deq = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    torch.testing.assert_close(model(x), x @ w_deq.T + bias, rtol=1e-6, atol=1e-6)


def test_double_quant_stores_8bit_block_scales(bnb) -> None:
    sizes = {}
    for double_quant in (True, False):
        model = _gaussian_linear(torch.float32)
        apply_qlora(model, QloraConfig(rank=4, double_quant=double_quant), target_modules=["0"])
        state = model[0].base_layer.weight.quant_state
        assert state.nested is double_quant and state.blocksize == 64
        assert state.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
        scale_bytes = state.absmax.numel() * state.absmax.element_size()
        if double_quant:
            scale_bytes += state.state2.absmax.numel() * state.state2.absmax.element_size()
        sizes[double_quant] = (128 * 256 // 2 + scale_bytes) / (128 * 256)
    # 4 bits + fp32/64 = 0.5625 B/param; 4 bits + 8/64 bits + fp32/(64·256) ≈ 0.516 B/param
    assert sizes[False] == pytest.approx(0.5625)
    assert sizes[True] == pytest.approx(0.516, abs=1e-3)


def test_adapters_are_identical_for_the_same_seed_and_match_lora(bnb) -> None:
    def adapters(fn) -> dict[str, torch.Tensor]:
        model = tiny_llama()
        torch.manual_seed(123)
        fn(model)
        return {n: p.detach().clone() for n, p in _lora_params(model).items()}

    first = adapters(lambda m: apply_qlora(m, QloraConfig(rank=4)))
    second = adapters(lambda m: apply_qlora(m, QloraConfig(rank=4)))
    assert first.keys() == second.keys() and len(first) == 28
    assert all(torch.equal(first[k], second[k]) for k in first)
    # quantizing draws nothing from the global RNG: qlora starts from the very adapters lora would
    lora = adapters(lambda m: apply_lora(m, LoraConfig(rank=4)))
    assert all(torch.equal(first[k], lora[k]) for k in first)
    assert any(v.abs().sum() > 0 for k, v in first.items() if "lora_A" in k)
    assert all(torch.count_nonzero(v) == 0 for k, v in first.items() if "lora_B" in k)


def test_gradients_reach_every_adapter_and_nothing_else(bnb) -> None:
    def model_and_grads(eval_first: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        model = tiny_llama(torch.bfloat16)
        torch.manual_seed(0)
        apply_qlora(model, QloraConfig(rank=4))
        with torch.no_grad():  # non-zero B, so that ∂L/∂A (through the NF4 backbone) is exercised
            for name, param in _lora_params(model).items():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        if eval_first:  # what the trainer does before training: an eval-mode, no-grad forward
            model.eval()
            with torch.no_grad():
                model(input_ids=_ids())
            model.train()
        model(input_ids=_ids(), labels=_ids()).loss.backward()
        return model, {n: p.grad for n, p in model.named_parameters()}

    model, grads = model_and_grads(eval_first=False)
    for name, grad in grads.items():
        if ".lora_" in name:
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        else:
            assert grad is None, name
    # On AVX512-BF16 CPUs bitsandbytes would repack the weights at that eval forward into an
    # inference layout whose kernel has no autograd, silently cutting ∂L/∂x through the backbone
    # (apply_qlora turns that off): the gradients must not depend on an earlier evaluation.
    _, grads_after_eval = model_and_grads(eval_first=True)
    for name, grad in grads.items():
        if grad is not None:
            assert torch.equal(grad, grads_after_eval[name]), name


def test_training_lowers_the_loss(bnb) -> None:
    model = tiny_llama()
    apply_qlora(model, QloraConfig(rank=4, alpha=8))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=_ids(), labels=_ids()).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_state_dict_round_trip_restores_codes_and_scales(bnb) -> None:
    trained = tiny_llama()
    apply_qlora(trained, QloraConfig(rank=4))
    with torch.no_grad():
        for param in _lora_params(trained).values():
            param.normal_(0.0, 0.05)
    state = trained.state_dict()
    q_proj = "model.layers.0.self_attn.q_proj.base_layer.weight"
    assert {
        f"{q_proj}.absmax",
        f"{q_proj}.quant_map",
        f"{q_proj}.nested_absmax",
        f"{q_proj}.quant_state.bitsandbytes__nf4",
    } <= state.keys()

    other = tiny_llama(seed=7)  # different base weights: different codes and block scales
    apply_qlora(other, QloraConfig(rank=4))
    assert not torch.equal(
        other.get_submodule("model.layers.0.self_attn.q_proj.base_layer").weight.quant_state.absmax,
        state[f"{q_proj}.absmax"],
    )
    # the quant-state keys are consumed by apply_qlora's hook
    other.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(other(input_ids=_ids()).logits, trained(input_ids=_ids()).logits)


def test_prepare_model_passes_dropout_and_double_quant(bnb) -> None:
    model = tiny_llama()
    names = prepare_model(model, QloraConfig(rank=4, dropout=0.1, double_quant=False))
    layer = model.get_submodule(names[0])
    assert layer.lora_dropout["default"].p == 0.1
    assert not layer.base_layer.weight.quant_state.nested
    lora = tiny_llama()
    names = prepare_model(lora, LoraConfig(rank=4, dropout=0.2))
    assert lora.get_submodule(names[0]).lora_dropout["default"].p == 0.2


def test_model_setup_passes_the_method_settings(bnb, monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra import compose, initialize_config_dir

    from falqon_dist.train import model_setup
    from falqon_dist.train.settings import validate

    class Loader:
        @staticmethod
        def from_pretrained(path, dtype, trust_remote_code):
            # model.trust_remote_code's default, passed explicitly
            assert trust_remote_code is False
            return tiny_llama(dtype)

    monkeypatch.setattr(model_setup, "AutoModelForCausalLM", Loader)
    with initialize_config_dir(
        config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"
    ):
        cfg = compose(
            config_name="config",
            overrides=[
                "run.dir=/tmp/falqon-test-run",
                "method=qlora",
                "deepspeed.zero_stage=2",
                "method.dropout=0.25",
                "method.double_quant=false",
                "method.rank=4",
            ],
        )
    model = model_setup.build_model("unused", validate(cfg), {})
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    assert layer.lora_dropout["default"].p == 0.25 and layer.r["default"] == 4
    assert not layer.base_layer.weight.quant_state.nested
    assert layer.base_layer.compute_dtype == torch.bfloat16  # model.dtype=bf16, the default


# ---------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"compute_dtype": torch.int8}, "compute_dtype"),
        (
            {"target_modules": ["model.layers.0.input_layernorm"]},
            "LlamaRMSNorm.*expected an nn.Linear",
        ),
        ({"target_modules": []}, "no target modules"),
        ({"module_filter_fn": lambda module, fqn: False}, "no target modules"),
        ({"module_filter_fn": lambda module, fqn: True, "target_modules": ["lm_head"]}, "not both"),
    ],
)
def test_bad_arguments_raise_before_anything_changes(bnb, kwargs, message) -> None:
    """(A bad rank, dropout or double_quant is refused by QloraConfig itself: test_baselines.py.)"""
    model = tiny_llama()
    before = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        apply_qlora(model, QloraConfig(rank=4), **kwargs)
    assert {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()} == before


def test_quantizing_twice_is_refused(bnb) -> None:
    model = tiny_llama()
    apply_qlora(model, QloraConfig(rank=4), target_modules=["model.layers.0.mlp.up_proj"])
    with pytest.raises(
        ValueError, match=r"Linear4bit with torch.uint8 weight \(already quantized\?\)"
    ):
        apply_qlora(
            model, QloraConfig(rank=4), target_modules=["model.layers.0.mlp.up_proj.base_layer"]
        )


def test_missing_bitsandbytes_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # `import bitsandbytes` now raises ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    model = tiny_llama()
    with pytest.raises(
        ImportError, match=r"method=qlora needs bitsandbytes.*pip install bitsandbytes.*\.\[qlora\]"
    ):
        apply_qlora(model, QloraConfig(rank=4))
    # untouched
    assert all(type(model.get_submodule(n)) is nn.Linear for n in target_module_names(model))
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        prepare_model(tiny_llama(), QloraConfig(rank=4))
