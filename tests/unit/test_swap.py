"""Choosing the layers a method adapts: names, dotted suffixes, regexes; checked against the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from falqon_dist.method.swap import matches, module_filter, select_modules, target_module_names
from falqon_dist.methods import method_config, prepare_model
from tests.models import tiny_llama


@pytest.mark.parametrize(
    "pattern, fqn, expected",
    [
        ("q_proj", "model.layers.0.self_attn.q_proj", True),
        ("self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),
        ("proj", "model.layers.0.self_attn.q_proj", False),  # a suffix is a whole dotted component
        (r"model\.layers\.[01]\.mlp\..*", "model.layers.1.mlp.up_proj", True),
        (r"model\.layers\.[01]\.mlp\..*", "model.layers.2.mlp.up_proj", False),
        ("[", "model.layers.0.self_attn.q_proj", False),  # not a regex: only names/suffixes
    ],
)
def test_patterns(pattern, fqn, expected):
    assert matches(pattern, fqn) is expected


def test_targets_and_excludes_select_the_same_layers_for_every_method():
    model = tiny_llama()
    default = target_module_names(model)
    chosen = target_module_names(
        model,
        select_modules(model, ["q_proj", "v_proj", "mlp.down_proj"], ["layers.0.self_attn.v_proj"]),
    )
    layers = len(model.model.layers)
    assert len(chosen) == 3 * layers - 1 and "model.layers.0.self_attn.v_proj" not in chosen
    assert set(chosen) < set(default)
    only_mlp = module_filter(exclude_modules=[r".*self_attn\..*"])
    for method in ("falqon", "lora", "fp8_lora"):
        model = tiny_llama()
        config = method_config(
            method, {"rank": 4, "backend": "emulated"} if method != "lora" else {"rank": 4}
        )
        names = prepare_model(model, config, module_filter_fn=only_mlp)
        assert names == [n for n in default if ".mlp." in n], method
        untouched = model.get_submodule("model.layers.0.self_attn.q_proj")
        assert type(untouched) is nn.Linear and not untouched.weight.requires_grad


def test_a_pattern_that_names_nothing_lists_the_models_layers():
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(
        ValueError,
        match=r"target_modules: 'qkv_proj' names no nn\.Linear of the model; its linear "
        r"layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
    ):
        select_modules(model, ["qkv_proj"])
    with pytest.raises(ValueError, match="exclude_modules: 'nope'"):
        select_modules(model, None, ["nope"])
    with pytest.raises(ValueError, match="leave no layer to adapt"):
        select_modules(model, ["q_proj"], ["q_proj"])
