"""FalqonCallback in a real transformers.Trainer, one process (2 ranks with DeepSpeed: tests/distributed)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import Trainer, TrainingArguments

import falqon_dist as fd
from falqon_dist.integrations import FalqonCallback
from tests.models import tiny_llama

STEPS, LR = 4, 0.05


class Repeated(torch.utils.data.Dataset):
    """The same causal-LM example n times: every batch is identical, whatever the Trainer's shuffle."""

    def __init__(self, n: int = 16) -> None:
        ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(3))
        self.item = {
            "input_ids": ids,
            "labels": ids.clone(),
            "attention_mask": torch.ones_like(ids),
        }
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.item.items()}


def converted():
    model = tiny_llama()
    fd.convert_model(model, fd.FalqonConfig(rank=4, backend="emulated"))
    return model


def train_with_callback(model, tmp_path, **callback_kwargs) -> tuple[Trainer, FalqonCallback]:
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        optim="adamw_torch_fused",
        logging_steps=2,
        disable_tqdm=True,
    )
    callback = FalqonCallback(**callback_kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=Repeated(), callbacks=[callback])
    trainer.train()
    return trainer, callback


def test_the_callback_merges_after_every_step_as_the_hand_written_loop_does(tmp_path):
    """The Trainer + callback against falqon_dist's own recipe (fused AdamW on B, as the Trainer's
    adamw_torch_fused; merge_proxies_ after each step): the same FP8 bytes, the same B."""
    model = converted()
    reference = copy.deepcopy(model)
    trainer, callback = train_with_callback(model, tmp_path)

    trainable = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0, fused=True)
    batch = {k: v.unsqueeze(0).repeat(2, 1) for k, v in Repeated().item.items()}
    for step in range(1, STEPS + 1):
        reference(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        fd.merge_proxies_(reference, step=step)
    layers, expected = fd.falqon_layers(model), fd.falqon_layers(reference)
    changed = sum(
        int((a.qweight != a_ref_init).sum())
        for (_, a), a_ref_init in zip(
            layers, [layer.qweight for _, layer in fd.falqon_layers(converted())], strict=True
        )
    )
    assert changed > 0  # the backbone learned
    for (name, got), (_, want) in zip(layers, expected, strict=True):
        assert torch.equal(got.qweight, want.qweight), name
        torch.testing.assert_close(got.B, want.B, rtol=1e-5, atol=1e-7)
    logged = [entry for entry in trainer.state.log_history if "falqon/rows_merged" in entry]
    assert len(logged) == STEPS // 2 and all(entry["falqon/nonfinite"] == 0 for entry in logged)
    assert (
        callback.totals["rows_merged"] == sum(entry["falqon/rows_merged"] for entry in logged) > 0
    )


def test_the_callback_exports_at_the_end_and_refuses_an_unconverted_model(tmp_path):
    model = converted()
    train_with_callback(model, tmp_path, export_dir=tmp_path / "fp8")
    assert "quantization_config" in json.loads((tmp_path / "fp8" / "config.json").read_text())
    with pytest.raises(ValueError, match="convert_model"):
        train_with_callback(tiny_llama(), tmp_path)


def test_the_callback_in_trls_sft_trainer(tmp_path):
    """TRL's SFTTrainer is a transformers.Trainer: the same callback merges there (pre-tokenized rows)."""
    trl = pytest.importorskip("trl")
    import datasets

    from falqon_dist.models.tokenizer import build_tiny_tokenizer

    model = converted()
    before = [layer.qweight.clone() for _, layer in fd.falqon_layers(model)]
    ids = Repeated().item["input_ids"].tolist()
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=LR,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_dict({"input_ids": [ids] * 8}),
        processing_class=build_tiny_tokenizer(),
        callbacks=[FalqonCallback()],
    )
    trainer.train()
    changed = sum(
        int((layer.qweight != old).sum())
        for (_, layer), old in zip(fd.falqon_layers(model), before, strict=True)
    )
    assert changed > 0 and [
        e["falqon/nonfinite"] for e in trainer.state.log_history if "falqon/nonfinite" in e
    ]


# ------------------------------------------------------------------- the post-optimizer hook, one process
RECIPES = [
    ("every_row", "nearest"),
    ("topk_carry", "nearest"),
    ("topk_keep", "stochastic"),
    ("paper", "nearest"),
]


def _with_proxies(model, scale: float, seed: int) -> None:
    """Random B in every layer (what an optimizer step leaves there), the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in fd.falqon_layers(model):
            layer.B.copy_(torch.randn(layer.B.shape, generator=generator) * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("merge, rounding", RECIPES)
def test_the_hook_merges_and_folds_as_merge_proxies_does_with_a_plain_torch_optimizer(
    merge, rounding, dtype
):
    """Without DeepSpeed the parameters are B's masters: the hook's model-level merge (and its fold)
    writes exactly the bytes, the B and the statistics of falqon_dist.merge_proxies_ (and fold_)."""
    from falqon_dist.distributed import ProxyMergeHook

    model = tiny_llama(dtype)
    fd.convert_model(
        model, fd.FalqonConfig(rank=4, backend="emulated", merge=merge, merge_rounding=rounding)
    )
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    hook = ProxyMergeHook(model, optimizer)
    assert not hook.masters.optimizer_masters  # a torch optimizer keeps no master apart from B
    for step in (1, 2):
        for each in (model, reference):
            _with_proxies(each, 0.02, step)
        got, want = hook(step).to_dict(), fd.merge_proxies_(reference, step=step).to_dict()
        assert got == want and got["rows_merged"] > 0, (got, want)
        for (name, layer), (_, expected) in zip(
            fd.falqon_layers(model), fd.falqon_layers(reference), strict=True
        ):
            assert torch.equal(layer.qweight, expected.qweight), name
            assert torch.equal(layer.B, expected.B) and layer.B.dtype == dtype, name
    assert hook.needs_fold == (merge != "paper")  # the paper's merge leaves B at zero
    for each in (model, reference):
        _with_proxies(each, 0.02, 3)
    folded = hook.fold()
    if merge == "paper":
        assert folded is None and all(layer.B.any() for _, layer in fd.falqon_layers(model))
        return
    for (name, layer), (_, expected) in zip(
        fd.falqon_layers(model), fd.falqon_layers(reference), strict=True
    ):
        expected.fold_()
        assert torch.equal(layer.qweight, expected.qweight) and not layer.B.any(), name
    assert folded.to_dict()["layers"] == len(fd.falqon_layers(model))


def test_the_hook_merges_only_the_layers_due_and_refuses_a_model_without_falqon_layers():
    from falqon_dist.distributed import ProxyMergeHook

    model = tiny_llama()
    fd.convert_model(model, fd.FalqonConfig(rank=4, backend="emulated", merge_every=2))
    hook = ProxyMergeHook(model)  # no optimizer: B stepped in place
    _with_proxies(model, 0.05, 1)
    before = [layer.qweight.clone() for _, layer in fd.falqon_layers(model)]
    assert hook(1).to_dict()["layers"] == 0  # merge_every=2: step 1 merges nothing
    assert all(
        torch.equal(old, layer.qweight) for old, (_, layer) in zip(before, fd.falqon_layers(model))
    )
    # B holds updates between merges
    assert hook(2).to_dict()["layers"] == len(before) and hook.needs_fold
    with pytest.raises(ValueError, match="no FalqonLinear"):
        ProxyMergeHook(tiny_llama())
