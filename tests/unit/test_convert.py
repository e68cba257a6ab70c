"""convert_model / merge_proxies_ on tiny Hugging Face models built from config (no downloads)."""

from __future__ import annotations

import copy
import gc
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import falqon_dist as fd
from falqon_dist.config_checks import InvalidField
from tests.models import tiny_llama


def tiny_neox() -> GPTNeoXForCausalLM:
    cfg = GPTNeoXConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return GPTNeoXForCausalLM(cfg)


CFG = fd.FalqonConfig(rank=8, backend="emulated")


@pytest.mark.parametrize(
    "build, expected_suffixes",
    [
        (tiny_llama, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        (tiny_neox, {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    ],
)
def test_convert_swaps_eligible_linears_and_freezes_the_rest(build, expected_suffixes):
    model = build()
    names = fd.convert_model(model, CFG)
    assert {n.split(".")[-1] for n in names} == expected_suffixes
    assert len(names) == len(expected_suffixes) * 2
    assert all(isinstance(model.get_submodule(n), fd.FalqonLinear) for n in names)
    assert not any(
        isinstance(m, fd.FalqonLinear) for n, m in model.named_modules() if n.endswith("lm_head")
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".B") for n in trainable)
    assert len(trainable) == len(names)


def test_convert_accepts_a_user_filter_and_skips_misaligned_layers():
    model = tiny_llama()
    names = fd.convert_model(model, CFG, module_filter_fn=lambda m, fqn: fqn.endswith("q_proj"))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    odd = nn.Sequential(nn.Linear(24, 32), nn.Linear(32, 32))
    assert fd.convert_model(odd, CFG) == ["1"]


def test_convert_names_the_layer_when_rank_is_too_large():
    with pytest.raises(
        InvalidField,
        match=r"rank cannot exceed.*'model\.layers\.0\.self_attn\.k_proj' \(64→32\) "
        r"has 32.*got 64",
    ) as refused:
        fd.convert_model(tiny_llama(), fd.FalqonConfig(rank=64, backend="emulated"))
    assert refused.value.field == "rank"


def test_convert_names_the_layer_when_topk_is_too_large():
    with pytest.raises(
        InvalidField,
        match=r"topk cannot exceed.*'model\.layers\.0\.self_attn\.k_proj' \(64→32\) "
        r"has 32.*got 48",
    ) as refused:
        fd.convert_model(
            tiny_llama(), fd.FalqonConfig(rank=8, merge="topk_keep", topk=48, backend="emulated")
        )
    assert refused.value.field == "topk"


def test_convert_releases_each_original_layer():
    model = tiny_llama()
    originals = [weakref.ref(m.weight) for n, m in model.named_modules() if n.endswith("proj")]
    fd.convert_model(model, CFG)
    gc.collect()
    assert all(ref() is None for ref in originals), (
        "converted layers must not keep their float weights alive"
    )


def test_converted_model_stays_close_to_the_original():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        fd.convert_model(model, CFG)
        out = model(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.1


def test_gradient_checkpointing():
    model = tiny_llama()
    fd.convert_model(model, CFG)
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 128, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith(".B")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_state_dict_round_trip_on_a_model():
    model = tiny_llama()
    fd.convert_model(model, CFG)
    for _, layer in fd.falqon_layers(model):
        with torch.no_grad():
            layer.B.normal_(std=0.01)
    fd.merge_proxies_(model)
    state = model.state_dict()
    fresh = tiny_llama()
    fd.convert_model(fresh, fd.FalqonConfig(rank=8, backend="emulated", init="random"))
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("merge", ["paper", "topk_keep", "topk_carry", "every_row"])
def test_adamw_with_merges_trains_a_converted_llama(merge):
    """End-to-end on a random tiny Llama: loss falls, merges happen, B is zero after every step
    (paper) or holds only rows no merge took (topk_keep: each step's top-k rows are zero;
    topk_carry: they hold what rounding dropped, so B is never zeroed; every_row, the default: every
    row merged, B holds only the carry).

    FALQON trains only B against a frozen A (and frozen embeddings), so a random model learns slowly;
    the strong learnability check is the teacher-student test in test_falqon_linear.py.
    """
    torch.manual_seed(0)
    model = tiny_llama()
    carry = merge in ("topk_carry", "every_row")
    if merge == "every_row":
        config = fd.FalqonConfig(rank=8, backend="emulated")
        assert config.merge == "every_row" and config.topk is None  # the default
    else:
        config = fd.FalqonConfig(rank=8, backend="emulated", merge=merge)
    fd.convert_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    # FALQON needs a large learning rate: small merged updates round away in E4M3 (docs/method.md, the carry)
    optimizer = torch.optim.AdamW(params, lr=1e-1, weight_decay=0.0)
    start = torch.randint(0, 128, (16, 1))
    columns = [start]
    for _ in range(15):  # a deterministic bigram: next = (5·token + 3) mod 128
        columns.append((columns[-1] * 5 + 3) % 128)
    batch = torch.cat(columns, dim=1)
    losses, merged = [], 0
    for _ in range(25):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        merged += fd.merge_proxies_(model).to_dict()["rows_merged"]
        losses.append(loss.item())
    assert merged > 0
    if merge == "paper":
        assert all(not p.any() for p in params), "B must be zero after every merge"
    elif not carry:  # at most out - rank rows of each B are non-zero: the merged ones were zeroed
        assert all(int(p.ne(0).any(dim=1).sum()) <= p.shape[0] - p.shape[1] for p in params)
        assert any(p.any() for p in params)
    else:
        assert all(torch.isfinite(p).all() and p.any() for p in params)
    assert losses[-1] < 0.95 * losses[0], losses


def test_failed_conversion_leaves_the_model_untouched():
    model = tiny_llama()
    with pytest.raises(ValueError, match="rank"):
        # fails on k_proj (32 rows)
        fd.convert_model(model, fd.FalqonConfig(rank=48, backend="emulated"))
    assert not fd.falqon_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_random_init_differs_between_layers_of_the_same_shape():
    model = tiny_llama()
    fd.convert_model(model, fd.FalqonConfig(rank=8, backend="emulated", init="random"))
    a = model.model.layers[0].self_attn.q_proj.adapter_weight()
    b = model.model.layers[1].self_attn.q_proj.adapter_weight()
    assert not torch.equal(a, b)


def test_conversion_device_builds_each_layer_there():
    """``device=`` moves each original linear just before conversion (the GPU case is in tests/gpu);
    on the device it is already on, the bytes are the default conversion's."""
    cfg = fd.FalqonConfig(rank=4, backend="emulated")
    default, moved = tiny_llama(), tiny_llama()
    fd.convert_model(default, cfg)
    fd.convert_model(moved, cfg, device="cpu")
    for (_, a), (_, b) in zip(fd.falqon_layers(default), fd.falqon_layers(moved), strict=True):
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scale, b.scale)


# ---------------------------------------------------------------- save_pretrained of a converted model
def test_save_pretrained_of_a_converted_model_runs_the_registered_saver(monkeypatch):
    """convert_model routes save_pretrained to the saver the export registers (the method never
    imports the export); a copy of the model saves itself; the class is left as it is."""
    from falqon_dist.method import convert

    calls = []
    monkeypatch.setattr(
        convert,
        "_saver",
        lambda model, directory, **kwargs: calls.append((model, directory, kwargs)),
    )
    model = tiny_llama()
    fd.convert_model(model, CFG)
    model.save_pretrained("out", max_shard_size="1GB")
    copied = copy.deepcopy(model)
    copied.save_pretrained("copy")
    assert calls == [(model, "out", {"max_shard_size": "1GB"}), (copied, "copy", {})]
    assert type(model).save_pretrained is type(tiny_llama()).save_pretrained


def test_save_pretrained_without_a_registered_saver_refuses_to_write_transformers_files(
    monkeypatch, tmp_path
):
    from falqon_dist.method import convert

    monkeypatch.setattr(convert, "_saver", None)
    model = tiny_llama()
    fd.convert_model(model, CFG)
    with pytest.raises(RuntimeError, match="import falqon_dist.export"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_importing_falqon_dist_is_enough_for_save_pretrained_to_write_the_fp8_export(tmp_path):
    """``import falqon_dist`` alone (no import of the export by the user) registers the FP8 export as
    a converted model's save_pretrained; the exporter itself is imported by the first save."""
    code = (
        "import json, pathlib, sys\n"
        "import falqon_dist as fd\n"
        "from tests.models import tiny_llama\n"
        "model = tiny_llama()\n"
        "fd.convert_model(model, fd.FalqonConfig(rank=8, backend='emulated'))\n"
        "assert 'falqon_dist.export.exporter' not in sys.modules\n"
        "model.save_pretrained(sys.argv[1])\n"
        "print(json.loads((pathlib.Path(sys.argv[1]) / 'config.json').read_text())['quantization_config']['format'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "saved")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "float-quantized"
