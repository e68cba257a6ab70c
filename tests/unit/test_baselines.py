"""Baselines: FP8 LoRA numerics, peft LoRA, full fine-tuning, their configs and the method registry (CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from falqon_dist.baselines import (
    QUANTIZE_OPS_PER_STEP,
    Fp8LoraConfig,
    Fp8LoraLinear,
    FullConfig,
    LoraConfig,
    QloraConfig,
    apply_lora,
    apply_qlora,
    convert_fp8_lora,
    prepare_full_finetune,
    target_module_names,
)
from falqon_dist.config_checks import InvalidField
from falqon_dist.fp8 import E4M3, E5M2, dequantize, from_bits, quantize_dynamic, sqnr_db
from falqon_dist.fp8.instrument import count_casts
from falqon_dist.method import FalqonConfig, FalqonLinear
from falqon_dist.methods import (
    METHODS,
    method_config,
    method_name,
    post_optimizer_hook,
    prepare_model,
)
from tests.models import tiny_llama

# SQNR floors (dB) against a float64 computation with the high-precision W, A, B. E4M3 alone gives
# about 30 dB on Gaussian data, E5M2 about 25 dB; products of two quantized operands lose 3–6 dB,
# and ∂L/∂A goes through two E5M2 casts (g and ∂L/∂h). Measured: 28 / 24 / 22 / 23 dB.
SQNR_FLOOR_DB = {"y": 24.0, "grad_x": 20.0, "grad_A": 17.0, "grad_B": 19.0}

BACKENDS = ["emulated", "scaled_mm"]


def _batch(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (2, 16), generator=generator)


def _fp8_lora_layer(
    backend: str, bias: bool = True, seed: int = 0
) -> tuple[nn.Linear, Fp8LoraLinear]:
    torch.manual_seed(seed)
    linear = nn.Linear(256, 128, bias=bias)
    layer = Fp8LoraLinear.from_linear(linear, rank=16, alpha=32.0, backend=backend)
    with torch.no_grad():
        # non-zero B, so that ∂L/∂A and the adapter path are exercised
        layer.lora_B.normal_(0.0, 0.05)
    return linear, layer


# ---------------------------------------------------------------------------------------------------
# Fp8LoraLinear numerics


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_lora_matches_float_reference_sqnr(backend: str) -> None:
    linear, layer = _fp8_lora_layer(backend)
    x = torch.randn(4, 32, 256, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)

    x_ref = x.detach().double().requires_grad_()
    a_ref = layer.lora_A.detach().double().requires_grad_()
    b_ref = layer.lora_B.detach().double().requires_grad_()
    y_ref = (
        x_ref @ linear.weight.double().T
        + linear.bias.double()
        + layer.scaling * (x_ref @ a_ref.T) @ b_ref.T
    )
    y_ref.backward(grad.double())

    measured = {
        "y": sqnr_db(y_ref.detach(), y.detach()),
        "grad_x": sqnr_db(x_ref.grad, x.grad),
        "grad_A": sqnr_db(a_ref.grad, layer.lora_A.grad),
        "grad_B": sqnr_db(b_ref.grad, layer.lora_B.grad),
    }
    for key, floor in SQNR_FLOOR_DB.items():
        assert measured[key] >= floor, f"{key}: {measured[key]:.1f} dB < {floor} dB ({backend})"


def test_fp8_lora_matches_exact_dequantized_reference() -> None:
    """Recompute every step from the same FP8 operands in float64: only accumulation order differs."""
    linear, layer = _fp8_lora_layer("emulated", bias=False)
    x = torch.randn(64, 256, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)

    def deq(t_hp: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
        t_fp8, scale = quantize_dynamic(t_hp.detach(), fmt)
        return dequantize(t_fp8, scale).double()

    c = layer.scaling
    x_d = deq(x, E4M3)
    a_d = deq(layer.lora_A, E4M3)
    b_d = deq(layer.lora_B, E4M3)
    w_d = layer.backbone_weight().double()
    h_d = deq((x_d @ a_d.T).float(), E4M3)
    y_exact = x_d @ w_d.T + c * h_d @ b_d.T
    g_d = deq(grad, E5M2)
    gh_d = deq((c * g_d @ b_d).float(), E5M2)
    grad_b_exact = c * g_d.T @ h_d
    grad_a_exact = gh_d.T @ x_d
    grad_x_exact = g_d @ w_d + gh_d @ a_d

    torch.testing.assert_close(y.double(), y_exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad.double(), grad_b_exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_A.grad.double(), grad_a_exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), grad_x_exact, rtol=1e-5, atol=1e-5)


def test_fp8_lora_backbone_is_fp8_and_only_adapter_trains() -> None:
    linear, layer = _fp8_lora_layer("emulated")
    assert layer.qweight.dtype == torch.uint8 and not layer.qweight.requires_grad
    assert layer.scale.dtype == torch.float32 and layer.scale.shape == (1,)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert sqnr_db(linear.weight.detach(), layer.backbone_weight()) > 25.0
    x = torch.randn(8, 256, requires_grad=True)
    layer(x).sum().backward()
    assert layer.qweight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_fp8_lora_starts_as_the_quantized_backbone() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    layer = Fp8LoraLinear.from_linear(linear, rank=8, backend="emulated")
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(16, 64)
    x_fp8, x_scale = quantize_dynamic(x, E4M3)
    expected = dequantize(x_fp8, x_scale) @ layer.backbone_weight().T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_fp8_lora_scale_survives_module_casts() -> None:
    _, layer = _fp8_lora_layer("emulated")
    layer.bfloat16()
    assert layer.scale.dtype == torch.float32 and layer.lora_A.dtype == torch.bfloat16
    assert layer.qweight.dtype == torch.uint8
    x = torch.randn(4, 256, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.dtype == x.grad.dtype == layer.lora_A.grad.dtype == torch.bfloat16


def test_quantize_op_counts_fp8_lora_vs_falqon() -> None:
    _, layer = _fp8_lora_layer("emulated")  # built first: converting W is a one-off, not per step
    with count_casts() as calls:
        layer(torch.randn(8, 256, requires_grad=True)).sum().backward()
    assert len(calls) == QUANTIZE_OPS_PER_STEP == 6
    assert calls.count(E5M2) == 2  # g and ∂L/∂h

    torch.manual_seed(0)
    falqon = FalqonLinear.from_linear(
        nn.Linear(256, 128), FalqonConfig(rank=16, backend="emulated")
    )
    with count_casts() as calls:
        falqon(torch.randn(8, 256, requires_grad=True)).sum().backward()
    assert calls == [E4M3, E4M3, E5M2]  # x, o_A, g
    falqon(torch.randn(8, 256, requires_grad=True)).sum().backward()
    assert len(calls) == 3  # the patch is undone on exit


def test_convert_fp8_lora_targets_falqon_layers_and_is_deterministic() -> None:
    model = tiny_llama()
    expected = target_module_names(model)
    names = convert_fp8_lora(model, Fp8LoraConfig(rank=4, alpha=8, backend="emulated"), seed=3)
    assert names == expected and "lm_head" not in names and len(names) == 14
    assert all(isinstance(model.get_submodule(n), Fp8LoraLinear) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}

    again = tiny_llama()
    convert_fp8_lora(again, Fp8LoraConfig(rank=4, alpha=8, backend="emulated"), seed=3)
    for (_, p), (_, q) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(
        from_bits(model.model.layers[0].mlp.up_proj.qweight).float(),
        from_bits(again.model.layers[0].mlp.up_proj.qweight).float(),
    )


# ---------------------------------------------------------------------------------------------------
# peft LoRA and full fine-tuning


def test_apply_lora_trains_only_adapters_and_reduces_loss() -> None:
    model = tiny_llama()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = apply_lora(model, LoraConfig(rank=4, alpha=8))
    assert names == target_module_names(tiny_llama()) and isinstance(model, LlamaForCausalLM)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(target_module_names(tiny_llama()))

    ids = _batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    # the backbone did not move (peft wraps each target as `<name>.base_layer`)
    for name, param in model.named_parameters():
        original = name.replace(".base_layer", "")
        if original in frozen_before:
            assert torch.equal(param, frozen_before[original]), name


def test_apply_lora_keeps_bf16_backbone_dtype() -> None:
    model = tiny_llama(torch.bfloat16)
    apply_lora(model, LoraConfig(rank=4))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_apply_lora_chooses_layers_by_filter_or_name_and_refuses_nothing_to_adapt() -> None:
    model = tiny_llama()
    names = apply_lora(
        model, LoraConfig(rank=4), module_filter_fn=lambda module, fqn: fqn.endswith("q_proj")
    )
    assert (
        names == [n for n in target_module_names(tiny_llama()) if n.endswith("q_proj")]
        and len(names) == 2
    )
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == set(names)
    assert apply_lora(
        tiny_llama(), LoraConfig(rank=4), target_modules=["model.layers.0.mlp.up_proj"]
    ) == ["model.layers.0.mlp.up_proj"]
    with pytest.raises(ValueError, match="not both"):
        apply_lora(
            tiny_llama(),
            LoraConfig(rank=4),
            module_filter_fn=lambda m, n: True,
            target_modules=["lm_head"],
        )
    with pytest.raises(ValueError, match="no target modules"):
        apply_lora(nn.Sequential(nn.Linear(10, 10)), LoraConfig(rank=2))


def test_prepare_full_finetune_unfreezes_everything() -> None:
    model = tiny_llama()
    for param in model.parameters():
        param.requires_grad_(False)
    names = prepare_full_finetune(model)
    assert names == [n for n, _ in model.named_parameters()]
    assert all(p.requires_grad for p in model.parameters())


def test_prepare_full_finetune_rejects_converted_model() -> None:
    model = tiny_llama()
    convert_fp8_lora(model, Fp8LoraConfig(rank=4, backend="emulated"))
    with pytest.raises(ValueError, match="qweight"):
        prepare_full_finetune(model)


# ---------------------------------------------------------------------------------------------------
# prepare_model


def test_method_configs_are_built_by_name_and_reject_bad_values_naming_the_field() -> None:
    assert method_config("lora", {"rank": 8, "dropout": 0.1}) == LoraConfig(rank=8, dropout=0.1)
    assert method_config("full", {}) == FullConfig() and method_name(QloraConfig()) == "qlora"
    with pytest.raises(ValueError, match=r"'adapterx'.*falqon.*lora.*fp8_lora.*qlora.*full"):
        method_config("adapterx", {})
    with pytest.raises(ValueError, match=r"LoraConfig has no field 'topk'"):
        method_config("lora", {"topk": 4})
    for config, fields, message in [
        (LoraConfig, {"rank": 0}, "LoraConfig.rank must be a positive integer, got 0"),
        (LoraConfig, {"dropout": 1.0}, r"LoraConfig.dropout must be a number in \[0, 1\), got 1.0"),
        (
            QloraConfig,
            {"alpha": -1.0},
            r"QloraConfig.alpha must be None \(= rank\) or a finite number > 0, got -1.0",
        ),
        (
            QloraConfig,
            {"double_quant": "yes"},
            "QloraConfig.double_quant must be true or false, got 'yes'",
        ),
        (Fp8LoraConfig, {"backend": "cuda"}, "Fp8LoraConfig.backend must be one of"),
        (FalqonConfig, {"topk": 0}, "FalqonConfig.topk must be None"),
    ]:
        with pytest.raises(InvalidField, match=message):
            config(**fields)
    with pytest.raises(TypeError, match="not a method config: dict"):
        prepare_model(tiny_llama(), {"rank": 4})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_forward_backward(method: str, dtype: torch.dtype) -> None:
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    model = tiny_llama(dtype)
    fields = {
        "falqon": {"rank": 4, "backend": "emulated"},
        "fp8_lora": {"rank": 4, "alpha": 8, "backend": "emulated"},
        "full": {},
    }.get(method, {"rank": 4, "alpha": 8})
    names = prepare_model(model, method_config(method, fields))
    assert names
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    if method != "full":
        assert sum(p.numel() for p in trainable) < sum(p.numel() for p in model.parameters()) / 4
    ids = _batch()
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in trainable]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_the_registry_points_at_the_public_convert_functions_and_only_falqon_has_a_post_optimizer_hook() -> (
    None
):
    from falqon_dist.distributed import ProxyMergeHook
    from falqon_dist.method import convert_model

    converts = {name: method.convert for name, method in METHODS.items()}
    assert converts == {
        "falqon": convert_model,
        "lora": apply_lora,
        "fp8_lora": convert_fp8_lora,
        "qlora": apply_qlora,
        "full": prepare_full_finetune,
    }  # no adapters in between
    model = tiny_llama()
    config = FalqonConfig(rank=4, backend="emulated")
    prepare_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    hook = post_optimizer_hook(config, model, optimizer)
    assert isinstance(hook, ProxyMergeHook) and hook.model is model and len(hook.layers) == 14
    for name in ("lora", "fp8_lora", "qlora", "full"):
        assert post_optimizer_hook(method_config(name, {}), model, optimizer) is None, name
