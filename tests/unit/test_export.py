"""export_fp8: compressed-tensors FP8 checkpoints of FALQON models (CPU, tiny Llama built from config)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import falqon_dist as fd
from falqon_dist.export import export_fp8
from falqon_dist.export import exporter as exporter_module
from falqon_dist.export.format import quantization_config
from falqon_dist.export.writer import INDEX_FILE, SINGLE_FILE, parse_size
from falqon_dist.fp8.formats import sqnr_db
from falqon_dist.method import default_filter

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    CompressedTensorsConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

#: Loaded-with-dequantize vs dequantized reference: same fp32 weights, same graph → only float noise.
DEQUANT_ATOL = 1e-4
#: Loaded-with-dequantize vs FALQON's own forward (which also quantizes activations to E4M3): measured
#: ~28 dB on this tiny model; 20 dB leaves room across seeds.
FALQON_MIN_SQNR_DB = 20.0
#: Loaded without dequantize (compressed-tensors fake-quantizes activations per token) vs reference.
W8A8_MIN_SQNR_DB = 20.0


def tiny_llama(dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    kwargs = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).to(dtype).eval()


def trained_falqon(
    dtype: torch.dtype = torch.float32, filter_fn=None, **overrides
) -> LlamaForCausalLM:
    """A converted tiny Llama with pending (non-zero) proxies, as if exported right after a step."""
    model = tiny_llama(dtype, **overrides)
    fd.convert_model(model, fd.FalqonConfig(rank=8, backend="emulated"), module_filter_fn=filter_fn)
    generator = torch.Generator().manual_seed(1)
    for _, layer in fd.falqon_layers(model):
        layer.B.data.copy_(torch.randn(layer.B.shape, generator=generator) * 0.05)
    return model


def dequantized_reference(model: nn.Module) -> nn.Module:
    """``model`` with every FALQON layer replaced by a float ``nn.Linear`` holding ``backbone_weight()``."""
    reference = copy.deepcopy(model)
    for name, layer in fd.falqon_layers(reference):
        parent, _, child = name.rpartition(".")
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight.data = layer.backbone_weight().to(layer.B.dtype)
        if layer.bias is not None:
            linear.bias.data = layer.bias.data.clone()
        setattr(reference.get_submodule(parent), child, linear)
    return reference


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118 - no __iter__
    return tensors


def load(directory: Path, **kwargs) -> nn.Module:
    # NB: passing quantization_config=None explicitly disables the quantizer in transformers 5.x.
    if kwargs:
        kwargs = {"quantization_config": CompressedTensorsConfig(**kwargs)}
    return AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()


@torch.no_grad()
def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits.float()


TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(trained model after export, its state right before export, export dir)."""
    model = trained_falqon()
    before = copy.deepcopy(model)
    out = export_fp8(model, tmp_path_factory.mktemp("export") / "fp8")
    return model, before, out


# ----------------------------------------------------------------------------------------- format
def test_config_declares_per_tensor_fp8_weights_and_dynamic_token_inputs(exported):
    model, _, out = exported
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "float-quantized"
    assert qc["quantization_status"] == "compressed"
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"] == {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "group_size": None,
        "strategy": "tensor",
        "dynamic": False,
    }
    assert (
        group["input_activations"]["strategy"] == "token"
        and group["input_activations"]["dynamic"] is True
    )
    assert (
        group["input_activations"]["type"] == "float"
        and group["input_activations"]["num_bits"] == 8
    )
    assert qc["ignore"] == ["lm_head"]
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert (out / "generation_config.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        SINGLE_FILE,
    ]


def test_quantization_config_matches_compressed_tensors_models():
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy

    qc = quantization_config(["lm_head", "model.layers.1.mlp.down_proj"])
    parsed = QuantizationConfig.model_validate(qc)
    dumped = parsed.model_dump(mode="json")
    assert {key: dumped[key] for key in qc} == qc
    scheme = parsed.config_groups["group_0"]
    assert scheme.weights.strategy == QuantizationStrategy.TENSOR
    assert scheme.input_activations.strategy == QuantizationStrategy.TOKEN


# ----------------------------------------------------------------------------------------- bytes
def test_exported_bytes_and_scales_are_the_trained_ones(exported):
    model, _, out = exported
    tensors = read_tensors(out)
    for name, layer in fd.falqon_layers(model):
        weight = tensors[f"{name}.weight"]
        assert weight.dtype == torch.float8_e4m3fn and weight.shape == (
            layer.out_features,
            layer.in_features,
        )
        assert torch.equal(weight.view(torch.uint8), layer.qweight.data[: layer.out_features])
        scale = tensors[f"{name}.weight_scale"]
        assert scale.dtype == torch.float32 and scale.shape == (1,)
        assert torch.equal(scale, layer.scale)
        assert f"{name}.B" not in tensors and f"{name}.qweight" not in tensors
    # Only the W rows: no adapter rows, no proxies, no other stray keys.
    expected = {name for name, _ in tiny_llama().named_parameters()}
    expected |= {f"{name}.weight_scale" for name, _ in fd.falqon_layers(model)}
    assert set(tensors) == expected


def test_pending_proxies_are_merged_before_export(exported):
    model, before, _ = exported
    merged_by_hand = copy.deepcopy(before)
    for _, layer in fd.falqon_layers(merged_by_hand):  # the export merges every row of a pending B
        layer.merge_proxy_(rows=torch.arange(layer.out_features))
    changed = 0
    for (name, layer), (_, reference), (_, original) in zip(
        fd.falqon_layers(model), fd.falqon_layers(merged_by_hand), fd.falqon_layers(before)
    ):
        assert torch.count_nonzero(layer.B) == 0, name
        assert torch.equal(layer.qweight.data, reference.qweight.data), name
        changed += int(not torch.equal(layer.qweight.data, original.qweight.data))
    assert changed == len(fd.falqon_layers(model))  # the merge did something in every layer


# ----------------------------------------------------------------------------------------- loading
def test_loads_with_transformers_and_matches_dequantized_reference(exported):
    model, _, out = exported
    loaded = load(out, dequantize=True)
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    got = logits(loaded, TOKENS)
    reference = logits(dequantized_reference(model), TOKENS)
    assert (got - reference).abs().max().item() < DEQUANT_ATOL
    assert sqnr_db(logits(model, TOKENS), got) > FALQON_MIN_SQNR_DB


def test_loads_compressed_and_runs_w8a8(exported):
    model, _, out = exported
    loaded = load(out)  # dequantize=False: compressed-tensors decompresses on the first forward
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    got = logits(loaded, TOKENS)
    assert sqnr_db(logits(dequantized_reference(model), TOKENS), got) > W8A8_MIN_SQNR_DB


def test_unconverted_linears_stay_float_and_are_ignored(tmp_path):
    skip = "model.layers.1.mlp.down_proj"
    model = trained_falqon(filter_fn=lambda m, fqn: default_filter(m, fqn) and fqn != skip)
    out = export_fp8(model, tmp_path / "fp8")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted(qc["ignore"]) == sorted(["lm_head", skip])
    tensors = read_tensors(out)
    assert (
        tensors[f"{skip}.weight"].dtype == torch.float32 and f"{skip}.weight_scale" not in tensors
    )
    assert torch.equal(tensors[f"{skip}.weight"], model.get_submodule(skip).weight)
    loaded = load(out, dequantize=True)
    assert torch.equal(loaded.get_submodule(skip).weight, model.get_submodule(skip).weight)
    got = logits(loaded, TOKENS)
    assert (got - logits(dequantized_reference(model), TOKENS)).abs().max().item() < DEQUANT_ATOL


def test_bias_tied_embeddings_and_bf16(tmp_path):
    model = trained_falqon(torch.bfloat16, attention_bias=True, tie_word_embeddings=True)
    out = export_fp8(model, tmp_path / "fp8")
    tensors = read_tensors(out)
    assert "lm_head.weight" not in tensors  # tied: written once, as save_pretrained does
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    name, layer = fd.falqon_layers(model)[0]
    assert torch.equal(tensors[f"{name}.bias"], layer.bias)
    assert tensors[f"{name}.weight_scale"].dtype == torch.float32
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load(out, dequantize=True)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    got = logits(loaded, TOKENS)
    reference = logits(dequantized_reference(model), TOKENS)
    # A plain bf16 save_pretrained/from_pretrained round trip differs by one bf16 ulp here too.
    assert (got - reference).abs().max().item() <= 1e-2 * reference.abs().max().item()


def test_sharded_export_has_an_index_and_loads(tmp_path, exported):
    model, _, single = exported
    out = export_fp8(model, tmp_path / "fp8", max_shard_size="100KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / SINGLE_FILE).exists()
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    total = sum(t.numel() * t.element_size() for t in read_tensors(out).values())
    assert index["metadata"]["total_size"] == total
    # each shard fits the limit (+ its JSON header) or holds one oversized tensor
    for path in shards:
        with safe_open(str(path), framework="pt") as handle:
            alone = len(handle.keys()) == 1
        assert alone or path.stat().st_size <= 100_000 + 10_000
    expected = read_tensors(single)
    got = read_tensors(out)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    loaded = load(out, dequantize=True)
    assert torch.equal(logits(loaded, TOKENS), logits(load(single, dequantize=True), TOKENS))


def test_unwraps_engine_like_wrappers_and_saves_tokenizer(tmp_path, exported):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(255)} | {"<unk>": 255}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")

    # what a DeepSpeed engine looks like from here: the HF model is .module
    class Engine(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module
            self.config = {"train_batch_size": 8}  # an engine has a config of its own

    model, _, single = exported
    out = export_fp8(Engine(model), tmp_path / "fp8", tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(out)("t1 t7")["input_ids"] == [1, 7]
    assert (out / SINGLE_FILE).read_bytes() == (single / SINGLE_FILE).read_bytes()


# ----------------------------------------------------------------------------------------- errors
def test_model_without_falqon_layers_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="no FalqonLinear"):
        export_fp8(tiny_llama(), tmp_path / "fp8")
    with pytest.raises(ValueError, match="PreTrainedModel"):
        export_fp8(nn.Sequential(nn.Linear(16, 16)), tmp_path / "fp8")
    assert not (tmp_path / "fp8").exists()


def test_non_empty_destination_needs_overwrite(tmp_path, exported):
    model, _, _ = exported
    out = tmp_path / "fp8"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_fp8(model, out)
    assert (out / "keep.txt").read_text() == "previous export"
    export_fp8(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / SINGLE_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp8"]  # no staging leftovers
    empty = tmp_path / "empty"
    empty.mkdir()
    export_fp8(model, empty)  # an existing empty directory is fine
    assert (empty / SINGLE_FILE).is_file()


@pytest.mark.parametrize("fail_in", ["tensors", "metadata"])
def test_a_crash_never_leaves_a_half_written_export(tmp_path, monkeypatch, exported, fail_in):
    model, _, _ = exported
    out = export_fp8(model, tmp_path / "fp8")
    good = read_tensors(out)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if fail_in == "tensors":
        calls = {"n": 0}
        real_add = exporter_module.ShardWriter.add

        def add_then_fail(self, name, tensor):
            calls["n"] += 1
            if calls["n"] > 5:
                boom()
            real_add(self, name, tensor)

        monkeypatch.setattr(exporter_module.ShardWriter, "add", add_then_fail)
    else:
        monkeypatch.setattr(exporter_module, "_write_metadata", boom)
    with pytest.raises(OSError, match="disk full"):
        export_fp8(model, out, overwrite=True, max_shard_size="50KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp8"]
    kept = read_tensors(out)
    assert set(kept) == set(good) and all(torch.equal(kept[k], good[k]) for k in kept)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size(1000) == 1000
    for bad in ("2 parsecs", "-1GB", 0, True):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


def test_pending_keep_mode_proxies_are_merged_row_for_row():
    """With merge="topk_keep", B holds rows no merge took yet: the export merges every one of them."""
    import copy

    from torch import nn

    import falqon_dist as fd
    from falqon_dist.export.exporter import merge_pending_proxies_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48, bias=False))
    fd.convert_model(model, fd.FalqonConfig(rank=16, backend="emulated", merge="topk_keep"))
    layer = model[0]
    with torch.no_grad():
        layer.B.normal_(std=0.2)
    before = layer.qweight.clone()
    expected = copy.deepcopy(layer)
    expected.merge_proxy_(rows=torch.arange(48))
    assert merge_pending_proxies_(model) == ["0"]
    assert torch.equal(layer.qweight, expected.qweight) and not layer.B.any()
    changed_rows = int((layer.qweight[:48] != before[:48]).any(dim=1).sum())
    assert changed_rows > layer.rows_per_merge  # not just one step's top-k


def test_the_pending_fold_is_the_hooks_fold_and_says_when_b_held_what_no_merge_leaves(caplog):
    """merge_pending_proxies_ folds through the trainer's model-level merge: the same bytes as the
    post-optimizer hook's fold; layers whose B is zero are left alone; a pending B under the paper's
    merge (which zeroes B after every step) is a warning, the carry of every_row only an info line."""
    import logging

    from torch import nn

    from falqon_dist.distributed import ProxyMergeHook
    from falqon_dist.export.exporter import merge_pending_proxies_

    for merge, level in (("every_row", logging.INFO), ("paper", logging.WARNING)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 48, bias=False), nn.Linear(48, 32, bias=False))
        fd.convert_model(model, fd.FalqonConfig(rank=16, backend="emulated", merge=merge))
        with torch.no_grad():
            model[0].B.normal_(std=0.2)  # model[1].B stays zero
        expected = copy.deepcopy(model)
        if merge == "every_row":
            assert ProxyMergeHook(expected[:1]).fold() is not None
        else:  # B is zero after every paper merge: the hook has nothing to fold, the layer folds itself
            expected[0].fold_()
        untouched = model[1].qweight.clone()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="falqon_dist.export.exporter"):
            assert merge_pending_proxies_(model) == ["0"]
        assert torch.equal(model[0].qweight, expected[0].qweight) and not model[0].B.any()
        assert torch.equal(model[1].qweight, untouched)
        assert [r.levelno for r in caplog.records] == [level], (merge, caplog.records)


# ------------------------------------------------------------------- save_pretrained of a converted model
def test_save_pretrained_of_a_converted_model_writes_the_fp8_export(tmp_path):
    """transformers' own save_pretrained would write FalqonLinear state under names from_pretrained
    does not know (every linear reloaded randomly initialized, silently): it writes the export."""
    model = trained_falqon()
    plain = tiny_llama()
    # the class is left as it is
    assert type(plain).save_pretrained is LlamaForCausalLM.save_pretrained
    model.save_pretrained(tmp_path / "saved", max_shard_size="10MB")
    assert "quantization_config" in json.loads((tmp_path / "saved" / "config.json").read_text())
    loaded = load(tmp_path / "saved", dequantize=True)
    got = logits(loaded, TOKENS)
    assert (got - logits(dequantized_reference(model), TOKENS)).abs().max().item() < DEQUANT_ATOL
    model.save_pretrained(
        tmp_path / "saved", state_dict=model.state_dict(), safe_serialization=True
    )  # Trainer's call
    copied = copy.deepcopy(model)
    assert copied.save_pretrained.__self__ is copied  # a copy saves itself, not the original


def test_save_pretrained_refuses_what_the_export_cannot_honour(tmp_path):
    model = trained_falqon()
    with pytest.raises(TypeError, match="export_fp8"):
        model.save_pretrained(tmp_path / "a", safe_serialization=False)
    with pytest.raises(TypeError, match="variant"):
        model.save_pretrained(tmp_path / "a", variant="fp16")
    next(model.parameters()).ds_id = 0  # what a ZeRO-3 partitioned parameter carries
    with pytest.raises(RuntimeError, match="on every rank.*FalqonCallback"):
        model.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a").exists()
