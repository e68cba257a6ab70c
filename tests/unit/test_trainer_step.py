"""The trainer's step: its collectives run on the rank's accelerator, never on CPU tensors (NCCL refuses
them), and the method's post-optimizer hook runs right after each optimizer step."""

from __future__ import annotations

import math

import pytest
import torch

from falqon_dist.method.merge_math import COUNT_NAMES
from falqon_dist.train import trainer
from falqon_dist.train.loss import StepSums, input_tokens


def _sums(device: torch.device, loss: float = 2.0, targets: int = 3, tokens: int = 7) -> StepSums:
    return StepSums(
        loss=torch.tensor(loss, device=device, dtype=torch.float64),
        targets=torch.tensor(targets, device=device),
        global_targets=torch.tensor(2 * targets, device=device),
        input_tokens=torch.tensor(tokens, device=device),
    )


def test_step_totals_are_built_and_all_reduced_on_the_engine_device(monkeypatch):
    """Run with the ``meta`` device standing in for a GPU: any CPU tensor reaching the collective fails."""
    seen: list[torch.device] = []
    monkeypatch.setattr(trainer.tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(
        trainer.tdist, "all_reduce", lambda tensor, *a, **k: seen.append(tensor.device)
    )
    device = torch.device("meta")
    totals = trainer.step_totals(_sums(device), device)
    assert seen == [device] and totals.device == device and totals.shape == (4,)


def test_step_totals_values_on_cpu():
    sums = _sums(torch.device("cpu"), loss=6.0, targets=4, tokens=16)
    assert trainer.step_totals(sums, torch.device("cpu")).tolist() == [6.0, 4.0, 16.0, 0.0]
    assert trainer.step_totals(sums, torch.device("cpu"), stop=True).tolist()[3] == 1.0


def test_input_tokens_stay_on_the_batch_device():
    batch = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0]] * 2),
    }
    assert input_tokens(batch).item() == 6
    assert input_tokens({"input_ids": torch.zeros(3, 4, dtype=torch.long)}).item() == 12


def test_lr_schedules_warm_up_then_decay_to_the_floor():
    from types import SimpleNamespace

    def factors(schedule: str) -> list[float]:
        train = SimpleNamespace(warmup_steps=4, schedule=schedule, max_steps=104, min_lr_ratio=0.1)
        factor = trainer.lr_lambda(SimpleNamespace(train=train))
        return [factor(step) for step in (0, 3, 4, 54, 104, 200)]

    assert factors("constant") == pytest.approx([0.2, 0.8, 1.0, 1.0, 1.0, 1.0])
    assert factors("cosine") == pytest.approx([0.2, 0.8, 1.0, 0.55, 0.1, 0.1])
    assert factors("linear") == pytest.approx([0.2, 0.8, 1.0, 0.55, 0.1, 0.1])
    train = SimpleNamespace(warmup_steps=4, schedule="cosine", max_steps=104, min_lr_ratio=0.1)
    cosine = trainer.lr_lambda(SimpleNamespace(train=train))
    assert cosine(29) > 0.55 + 0.2  # cosine stays high longer than linear early in the decay


VOCAB = 5


class _Engine:
    """DeepSpeed's engine as train_step sees it (one rank): the optimizer steps (``global_steps``
    advances) at every ``accum``-th ``step()`` only; the model predicts uniformly (zero logits)."""

    device = torch.device("cpu")
    dp_world_size, gradient_average, data_parallel_group = 1, True, None

    def __init__(self, accum: int) -> None:
        self.accum, self.micro, self.global_steps, self.events = accum, 0, 0, []

    def gradient_accumulation_steps(self) -> int:
        return self.accum

    def __call__(self, **batch):
        from types import SimpleNamespace

        assert "labels" not in batch  # the loss is summed by the trainer, not the model
        return SimpleNamespace(logits=torch.zeros(*batch["input_ids"].shape, VOCAB))

    def backward(self, loss, scale_wrt_gas: bool = True) -> None:
        assert not scale_wrt_gas
        self.events.append("backward")

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum == 0:
            self.global_steps += 1
            self.events.append(f"optimizer step {self.global_steps}")

    def get_lr(self) -> list[float]:
        return [0.1]

    def get_global_grad_norm(self) -> float:
        return 0.5


class _Hook:
    """A post-optimizer hook that records when it runs; ``layers`` in the stats it returns."""

    def __init__(self, engine: _Engine, layers: int = 2) -> None:
        self.engine, self.layers = engine, layers

    def __call__(self, step: int):
        from falqon_dist.method.merge_math import MergeStats

        self.engine.events.append(f"merge {step}")
        # rows_merged, saturated, nonfinite, changed, elements
        counts = [torch.tensor(v) for v in (3, 1, 0, 5, 40)]
        return MergeStats(*counts, layers=self.layers)


def _trainer(accum: int, hook_layers: int | None):
    from types import SimpleNamespace

    engine = _Engine(accum)
    # train_step's state only: no run directory, no model
    step = trainer.Trainer.__new__(trainer.Trainer)
    step.engine, step.merge_hook = (
        engine,
        None if hook_layers is None else _Hook(engine, hook_layers),
    )
    step.settings = SimpleNamespace(train=SimpleNamespace(grad_accum=accum))
    # 3 targets after the causal shift
    labels = torch.tensor([[-100, -100, 1, 2], [-100, 3, 4, -100]])
    step.batches = SimpleNamespace(
        next=lambda: {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels}
    )
    step.preemption = SimpleNamespace(requested=False)
    return step, engine


def test_train_step_runs_the_post_optimizer_hook_right_after_the_optimizer_step_with_its_counter():
    step, engine = _trainer(accum=3, hook_layers=2)
    record = step.train_step()
    assert engine.events == ["backward", "backward", "backward", "optimizer step 1", "merge 1"]
    assert {k: record[k] for k in COUNT_NAMES} == {
        "rows_merged": 3,
        "saturated": 1,
        "nonfinite": 0,
        "changed": 5,
        "elements": 40,
    }
    # uniform over VOCAB
    assert record["loss"] == pytest.approx(math.log(VOCAB)) and record["grad_norm"] == 0.5
    step.train_step()
    assert engine.events[-2:] == ["optimizer step 2", "merge 2"]


def test_train_step_without_a_hook_or_with_no_layer_due_records_no_merge():
    for layers in (None, 0):  # a baseline method; FALQON at a step method.merge_every skips
        step, engine = _trainer(accum=2, hook_layers=layers)
        record = step.train_step()
        assert not set(COUNT_NAMES) & set(record), record
        assert engine.events[-1] == ("optimizer step 1" if layers is None else "merge 1")
