"""The step's token-weighted loss (falqon_dist/train/loss.py) on one process: the summed loss is
transformers' own, each micro-batch back-propagates ``S · D / N`` (one all-reduce of the count, on
the device), and the accumulation adds no host synchronization to the step.

The same loss through DeepSpeed on 1 and 2 ranks, against plain torch: tests/distributed/test_token_loss.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from falqon_dist.baselines.config import LoraConfig
from falqon_dist.data.collate import Collator
from falqon_dist.data.tokenization import IGNORE_INDEX, tokenize_record
from falqon_dist.fp8.instrument import HostSyncCounter
from falqon_dist.method import FalqonConfig
from falqon_dist.methods import prepare_model
from falqon_dist.models import build_tiny_model, build_tiny_tokenizer
from falqon_dist.train import loss as token_loss
from falqon_dist.train import trainer

#: Responses of 2, 5, 12 and 20 target tokens.
RESPONSES = ["a", "dcba", "hello world", "the quick brown fox"]


def _labels(generator: torch.Generator, shape: tuple[int, int], vocab: int) -> torch.Tensor:
    labels = torch.randint(0, vocab, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < 0.4] = IGNORE_INDEX
    return labels


def test_token_loss_sum_is_transformers_loss_summed_over_the_shifted_targets():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 11, generator=generator, dtype=torch.float64).float()
    labels = _labels(generator, (3, 9), 11)
    count = token_loss.target_count(labels)
    assert int(count) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    mean = ForCausalLMLoss(logits, labels, vocab_size=11)  # HF's mean over the same targets
    assert torch.allclose(token_loss.token_loss_sum(logits, labels), mean * count, rtol=1e-6)
    summed = ForCausalLMLoss(logits, labels, vocab_size=11, num_items_in_batch=torch.tensor(1))
    assert torch.allclose(token_loss.token_loss_sum(logits, labels), summed, rtol=1e-6)
    assert token_loss.shifted_labels(labels).shape == labels.shape


def test_no_target_anywhere_gives_a_zero_loss_not_nan():
    labels = torch.full((2, 5), IGNORE_INDEX)
    assert token_loss.token_loss_sum(torch.randn(2, 5, 7), labels) == 0
    assert token_loss.target_count(labels) == 0


class _Engine:
    """DeepSpeed's engine as accumulate_step sees it, on a plain module: ``backward`` records the
    loss it was given; ``dp_world_size`` and ``gradient_average`` as DeepSpeed's."""

    device = torch.device("cpu")
    data_parallel_group = None

    def __init__(
        self, model: torch.nn.Module, accum: int, world: int = 1, average: bool = True
    ) -> None:
        self.model, self.accum, self.dp_world_size, self.gradient_average = (
            model,
            accum,
            world,
            average,
        )
        self.losses: list[torch.Tensor] = []
        self.steps = 0

    def gradient_accumulation_steps(self) -> int:
        return self.accum

    def __call__(self, **inputs):
        return self.model(**inputs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        assert not scale_wrt_gas  # DeepSpeed must not divide by the accumulation steps again
        self.losses.append(loss.detach())
        loss.backward()

    def step(self) -> None:
        self.steps += 1


def _model(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(), dtype=torch.float32)
    prepare_model(
        model, LoraConfig(rank=4) if method == "lora" else FalqonConfig(rank=4, backend="emulated")
    )
    return model


def _micro_batches(count: int) -> list[dict[str, torch.Tensor]]:
    """The 4 examples (prompts of different lengths too) as ``count`` padded micro-batches."""
    tokenizer = build_tiny_tokenizer()
    items = [tokenize_record({"prompt": f"copy({'xyz'[:1 + i % 3] * (i + 1)})=", "response": response}, tokenizer,
                             128)[0] for i, response in enumerate(RESPONSES)]  # fmt: skip
    size = len(items) // count
    collate = Collator(tokenizer.pad_token_id)
    return [collate(items[i * size : (i + 1) * size]) for i in range(count)]


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def test_each_micro_batch_back_propagates_its_sum_over_the_step_count(monkeypatch):
    """One rank of two (the all-reduce doubles the count, as a peer with the same targets would):
    micro-batch m back-propagates S_m · 2 / N with N = 2 · Σ_m |T_m|; one all-reduce, of the count."""
    reduced: list[torch.Tensor] = []

    def all_reduce(tensor, group=None):
        reduced.append(tensor.clone())
        tensor.mul_(2)

    monkeypatch.setattr(token_loss.tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(token_loss.tdist, "all_reduce", all_reduce)
    model = _model("lora")
    batches = _micro_batches(2)
    engine = _Engine(model, accum=2, world=2)
    sums = token_loss.accumulate_step(engine, batches)
    local = sum(int(token_loss.target_count(b["labels"])) for b in batches)
    assert [int(t) for t in reduced] == [local] and int(sums.global_targets) == 2 * local
    assert int(sums.targets) == local and engine.steps == 1  # the boundary's step() is the caller's
    with torch.no_grad():
        outputs = [model(**{k: v for k, v in b.items() if k != "labels"}) for b in batches]
        expected = [
            token_loss.token_loss_sum(o.logits, b["labels"]) for o, b in zip(outputs, batches)
        ]
    assert torch.allclose(
        torch.stack(engine.losses), torch.stack(expected) * 2 / (2 * local), rtol=1e-6
    )
    assert torch.allclose(sums.loss, torch.stack(expected).double().sum(), rtol=1e-6)
    summing = _Engine(
        _model("lora"), accum=2, world=2, average=False
    )  # gradient_allreduce_op="sum"
    token_loss.accumulate_step(summing, batches)
    assert torch.allclose(
        torch.stack(summing.losses), torch.stack(expected) / (2 * local), rtol=1e-6
    )  # no D


@pytest.mark.parametrize("method", ["lora", "falqon"])
def test_the_gradient_does_not_depend_on_the_accumulation_split(method):
    """One rank, 1 x 4, 2 x 2 and 4 x 1 (micro-batch x accumulation, padded differently): LoRA's
    gradient is the token-weighted one of the 4 examples, each forwarded alone, in every split.
    FALQON's only where each micro-batch is one example: its FP8 casts take tensor-wise scales over
    the rows of a micro-batch (tests/distributed/test_token_loss.py compares the other splits)."""
    grads = {}
    for count in (1, 2, 4):
        model = _model(method)
        token_loss.accumulate_step(_Engine(model, accum=count), _micro_batches(count))
        grads[count] = _grads(model)
    one = _single_example_reference(method)
    if method == "lora":
        for count, grad in grads.items():
            assert (grad - one).norm() / one.norm() < 1e-5, count
    else:  # exactly the token-weighted gradient where each micro-batch is one example (no FP8 mixing)
        assert (grads[4] - one).norm() / one.norm() < 1e-5


def _single_example_reference(method: str) -> torch.Tensor:
    """∇ (Σ token losses of the 4 examples, each alone and unpadded / their target count)."""
    model = _model(method)
    total, count = 0.0, 0
    for batch in _micro_batches(4):
        keep = batch["attention_mask"][0].bool()
        ids, labels = batch["input_ids"][:, keep], batch["labels"][:, keep]
        total = total + token_loss.token_loss_sum(model(input_ids=ids).logits, labels)
        count += int(token_loss.target_count(labels))
    (total / count).backward()
    return _grads(model)


def test_the_micro_batch_count_must_be_the_engines():
    with pytest.raises(ValueError, match="accumulates 2"):
        token_loss.accumulate_step(_Engine(torch.nn.Linear(1, 1), accum=2), _micro_batches(1))


def _old_accumulation(engine: _Engine, micro_batches) -> list[torch.Tensor]:
    """The trainer's micro-batch loop before the token-weighted loss: the model's mean loss."""
    losses = []
    for index, batch in enumerate(micro_batches):
        loss = engine.model(**batch, use_cache=False).loss
        loss.backward()
        if index < len(micro_batches) - 1:
            engine.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("method", ["lora", "falqon"])
def test_the_accumulation_adds_no_host_synchronization(method):
    """Host synchronizations (``.item``/``.tolist``/``aten._local_scalar_dense``, data-dependent
    shapes) of one step's accumulation, counted on CPU: the token count, its all-reduce and the
    summed loss add none to what the model's own forward and backward cost; the whole train step
    adds its one read-back of the totals."""
    batches = _micro_batches(2)
    with HostSyncCounter() as old:
        _old_accumulation(_Engine(_model(method), accum=2), batches)
    with HostSyncCounter() as new:
        token_loss.accumulate_step(_Engine(_model(method), accum=2), batches)
    assert new.by_op == old.by_op, (new.by_op, old.by_op)
    print(
        f"{method}: host synchronizations of the accumulation: before {old.total}, after {new.total}"
    )

    engine = _Engine(_model(method), accum=2)
    engine.global_steps = 0
    engine.get_lr, engine.get_global_grad_norm = (lambda: [0.1]), (lambda: None)
    step = trainer.Trainer.__new__(trainer.Trainer)  # train_step's state only
    stream = iter(batches)
    step.engine, step.merge_hook = engine, None
    step.settings = SimpleNamespace(train=SimpleNamespace(grad_accum=2))
    step.batches = SimpleNamespace(next=lambda: next(stream))
    step.preemption = SimpleNamespace(requested=False)
    with HostSyncCounter() as whole:
        record = step.train_step()
    assert whole.total == new.total + 1 and whole.by_op["tolist"] == 1, (
        whole.by_op
    )  # the record's read-back
    assert record["loss"] == pytest.approx(sum(float(loss) for loss in engine.losses), rel=1e-6)
