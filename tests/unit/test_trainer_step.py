"""The trainer's per-step collectives run on the rank's accelerator, never on CPU tensors (NCCL refuses them)."""

from __future__ import annotations

import torch

from falqon_dist.train import trainer


def test_step_totals_are_built_and_all_reduced_on_the_engine_device(monkeypatch):
    """Run with the ``meta`` device standing in for a GPU: any CPU tensor reaching the collective fails."""
    seen: list[torch.device] = []
    monkeypatch.setattr(trainer.tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(trainer.tdist, "all_reduce", lambda tensor, *a, **k: seen.append(tensor.device))
    device = torch.device("meta")
    losses = [torch.ones((), device=device, requires_grad=True) * 2 for _ in range(3)]
    tokens = [torch.tensor(7, device=device) for _ in range(3)]
    totals = trainer.step_totals(losses, tokens, device)
    assert seen == [device] and totals.device == device and totals.shape == (4,)


def test_step_totals_values_on_cpu():
    losses = [torch.tensor(2.0, requires_grad=True), torch.tensor(4.0)]
    tokens = [torch.tensor(10), torch.tensor(6)]
    assert trainer.step_totals(losses, tokens, torch.device("cpu")).tolist() == [6.0, 2.0, 16.0, 0.0]
    assert trainer.step_totals(losses, tokens, torch.device("cpu"), stop=True).tolist()[3] == 1.0


def test_input_tokens_stay_on_the_batch_device():
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0, 0]] * 2)}
    assert trainer._input_tokens(batch).item() == 6
    assert trainer._input_tokens({"input_ids": torch.zeros(3, 4, dtype=torch.long)}).item() == 12


def test_lr_schedules_warm_up_then_decay_to_the_floor():
    from types import SimpleNamespace

    import pytest

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
