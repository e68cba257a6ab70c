"""The training loss of one optimizer step, weighted by token over the whole step.

One optimizer step covers micro-batches ``m = 1..G`` (``train.grad_accum``) on each data-parallel rank
``r = 1..D``. Its objective is the mean cross-entropy over every target token of the step::

    L = Σ_{r,m} S_{r,m} / N        S_{r,m} = Σ_{t ∈ T(r,m)} CE(logits_t, label_{t+1})
                                   N       = Σ_{r,m} |T(r,m)|

``T(r,m)``: the positions of micro-batch ``(r, m)`` whose label after transformers' causal shift
(position ``t`` predicts the label at ``t + 1``) is not ``IGNORE_INDEX``: the response tokens, the
assistant turns, or every real token with ``data.train_on_inputs``. Every target token weighs
``1/N``, whichever micro-batch or rank it is in, so the gradient of a fixed global batch does not
change with ``micro_batch_size × grad_accum × ranks``. Averaging each micro-batch's own mean instead
(``model(**batch).loss``) would give a token of a micro-batch with few targets (a short answer, a
packed row of mostly prompts) more weight than one of a long answer.

**DeepSpeed's scaling** (0.19, read from its source). ``engine.backward(loss)`` divides the loss
by ``gradient_accumulation_steps`` unless ``scale_wrt_gas=False`` (and then the per-output hooks of
the engine's forward leave the gradient unscaled too: the engine registered the backward's graph).
At the accumulation boundary every ZeRO stage averages the accumulated gradient over the
data-parallel group: stage 0 in ``DeepSpeedEngine.allreduce_bucket`` (``× 1/f`` before the
all-reduce and ``× f/D`` after it, ``f`` = ``gradient_predivide_factor``: ``1/D`` in all),
ZeRO-1/2 in ``DeepSpeedZeroOptimizer.average_tensor`` (the same ``1/D``), ZeRO-3 in
``__avg_scatter_contiguous_grads`` (``1/D``). With ``gradient_allreduce_op: "sum"`` in the user's
DeepSpeed JSON (refused by DeepSpeed under ZeRO-3) stages 0–2 sum instead
(``engine.gradient_average`` is False). So micro-batch ``(r, m)`` back-propagates::

    ℓ_{r,m} = S_{r,m} · D / N      with scale_wrt_gas=False; D = engine.dp_world_size, 1 when DeepSpeed sums

and the gradient the optimizer sees is ``(1/D) Σ_r Σ_m ∇ℓ_{r,m} = ∇L``. ``N`` is counted on the
device before the first forward of the step (every micro-batch is fetched first) and all-reduced
over the data-parallel group once per step, on the device (NCCL refuses CPU tensors) and never read
back: no host synchronization. ``N = 0`` (no target in the whole step) counts as 1: a zero loss and
zero gradient rather than ``0/0``.

**Why the loss is summed here, from the logits.** The labels are kept out of the model's forward
(it then computes no loss of its own) and ``S_{r,m}`` is computed from ``outputs.logits``, rather
than handing ``N`` to transformers' ``num_items_in_batch`` forward argument. transformers 5.25's
``LlamaForCausalLM.forward`` does pass its ``**kwargs`` to ``ForCausalLMLoss`` (sum, then ``/
num_items_in_batch``) and peft 0.21's ``PeftModelForCausalLM.forward`` passes them to the base
model, but a model whose forward accepts ``**kwargs`` without giving them to its loss (another
architecture, remote code) would silently return its per-micro-batch mean, wrong by a factor per
micro-batch with no error. Every method (falqon, lora and qlora through peft, fp8_lora, full)
returns the logits the same way, so this is right for all of them; and it is the eval loss's own
definition (:func:`falqon_dist.data.generation.response_loss_sums`). The cost is transformers' own:
one float32 copy of the logits under bf16 (none in fp32), the labels padded by one ``IGNORE_INDEX``
rather than the logits sliced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from falqon_dist.data.tokenization import IGNORE_INDEX


@dataclass(frozen=True)
class StepSums:
    """What one optimizer step's micro-batches leave on the device, this rank's unless said otherwise."""

    #: ``Σ_m S_{r,m}``: the cross-entropy summed over this rank's target tokens (float64, detached).
    loss: torch.Tensor
    #: ``Σ_m |T(r,m)|``: this rank's target tokens (int64).
    targets: torch.Tensor
    #: ``N``: the target tokens of the whole step, every micro-batch of every rank (int64).
    global_targets: torch.Tensor
    #: Non-padding input tokens of this rank's micro-batches (int64), for ``tokens_per_s``.
    input_tokens: torch.Tensor


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts (transformers' causal shift): ``labels[:, t + 1]``, and
    ``IGNORE_INDEX`` at the last position. Same shape as ``labels``, so the logits need no slice."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def target_count(labels: torch.Tensor) -> torch.Tensor:
    """``|T|``: positions whose shifted label is a target (int64, on ``labels``' device)."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``S = Σ_{t ∈ T} CE(logits_t, label_{t+1})``, in float32, differentiable in ``logits``."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        shifted_labels(labels).reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def input_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Non-padding input tokens as a device tensor (packed rows count whole: their padding is a short tail)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.full(
        (), batch["input_ids"].numel(), dtype=torch.int64, device=batch["input_ids"].device
    )


def global_target_count(
    labels: Sequence[torch.Tensor], group: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(this rank's target tokens, N)`` for one step's micro-batch ``labels``: ONE all-reduce over
    the data-parallel ``group`` (all ranks when None), on the labels' device, never read back."""
    local = torch.stack([target_count(batch_labels) for batch_labels in labels]).sum()
    total = local.clone()
    if tdist.is_initialized():
        tdist.all_reduce(total, group=group)
    return local, total


def gradient_average_divisor(engine: Any) -> int:
    """``D``: what DeepSpeed divides the rank-summed gradient by, the data-parallel world size (1
    with ``gradient_allreduce_op: "sum"``). See the module docstring for where each ZeRO stage does it."""
    return int(engine.dp_world_size) if engine.gradient_average else 1


def accumulate_step(engine: Any, micro_batches: Sequence[dict[str, torch.Tensor]]) -> StepSums:
    """The forward and backward passes of one optimizer step's ``micro_batches`` (this rank's, one
    per accumulation step), each back-propagating ``S_{r,m} · D / N`` with ``scale_wrt_gas=False``
    (the module docstring derives it): the gradients DeepSpeed holds afterwards are those of the
    step's token-weighted mean loss.

    ``engine``: DeepSpeed's engine (``falqon_dist.distributed.initialize``). Every micro-batch is
    moved to ``engine.device`` and its targets counted before the first forward (the one all-reduce
    of the count). ``engine.step()`` follows every backward but the last: DeepSpeed's micro-step
    bookkeeping (its accumulation boundary is ``(micro_steps + 1) % gradient_accumulation_steps ==
    0``), no optimizer step. The caller calls ``engine.step()`` after the last one: that is the
    optimizer step. Nothing is read back to the host.
    """
    expected = engine.gradient_accumulation_steps()
    if len(micro_batches) != expected:
        raise ValueError(
            f"{len(micro_batches)} micro-batches for one optimizer step; the engine accumulates {expected}"
        )
    device = engine.device
    batches = [{key: value.to(device) for key, value in batch.items()} for batch in micro_batches]
    local_targets, total = global_target_count(
        [batch["labels"] for batch in batches], engine.data_parallel_group
    )
    scale = gradient_average_divisor(engine) / total.clamp(min=1).to(torch.float32)
    losses, tokens = [], []
    for index, batch in enumerate(batches):
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        summed = token_loss_sum(engine(**inputs, use_cache=False).logits, batch["labels"])
        engine.backward(summed * scale, scale_wrt_gas=False)
        if index < len(batches) - 1:
            engine.step()
        losses.append(summed.detach().double())
        tokens.append(input_tokens(batch))
    return StepSums(
        loss=torch.stack(losses).sum(),
        targets=local_targets,
        global_targets=total,
        input_tokens=torch.stack(tokens).sum(),
    )
