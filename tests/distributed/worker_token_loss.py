"""One optimizer step's gradient is that of the token-weighted loss, whatever the micro-batch layout.
Run by test_token_loss.py via torchrun on 1 or 2 gloo ranks: ``worker_token_loss.py LAYOUTS STAGES``,
e.g. ``1x4,2x2,4x1 0,2,3`` (micro-batch size x accumulation steps per rank; ZeRO stages).

A global batch of 4 examples whose responses have 2, 5, 12 and 20 target tokens goes through
:func:`falqon_dist.train.loss.accumulate_step` under DeepSpeed (float32, the embedded tiny Llama) in
each layout, for LoRA (peft; B drawn at random so that A has a gradient too) and FALQON (B; the
emulated FP8 backend). The trainable gradients are read at the accumulation boundary, before the
optimizer step: ZeRO-0 ``p.grad`` (averaged by the boundary backward), ZeRO-2/3
``deepspeed.utils.safe_get_full_grad``. Two sets of examples: ``same-length`` (prompts filled so
that every example is 32 tokens: no padding) and ``padded`` (prompts of different lengths too).
Every difference is ``‖g − ref‖₂ / ‖ref‖₂`` over all trainable gradients, allowed TOL = 1e-5 (float32
rounding); rank 0 prints each (``DIFF`` lines) and ``CHECK <set>-<method>-zero<stage>-<m>x<g> <check> ok``:

* ``matches-partition-reference``: plain torch's (no DeepSpeed) gradient of Σ token losses / N over
  the very same collated micro-batches of every rank, in one process.
* ``matches-global-reference``: plain torch's gradient of Σ token losses of the 4 examples (each
  forwarded alone, unpadded) / their response-token count: the layout-free definition. LoRA, both
  sets. FALQON quantizes activations and gradients with tensor-wise scales ``amax/F`` over whatever
  rows share a micro-batch, so its gradient depends on the layout by FP8 rounding (~15-25% here,
  with or without padding: a property of the casts, not of the loss); ``falqon-pow2`` rounds those
  scales up to a power of two (:func:`pow2_casts`), which makes each element's rounding its own,
  and is compared on the same-length set (pad rows can still move a scale by a power of two).
* ``old-normalization-fails``: where a step has more than one micro-batch, the gradient of the mean
  of each micro-batch's own mean loss (what averaging ``model(**batch).loss`` gave) is at least
  10 x TOL from the partition reference: the checks tell the two apart.
* ``record-loss``: accumulate_step's sums, reduced over ranks, give the reference's Σ token losses / N.

FALQON is not compared under ZeRO-3: ZeRO-3 replaces ``torch.nn.functional.linear`` with its own
autograd function and adds module hooks, so its float32 gradients differ from plain torch's by
rounding (LoRA: 4e-7), and FALQON's FP8 casts of the gradients turn some of those roundings into
whole FP8 steps (up to 1.4e-2 measured): no float32 tolerance applies. ``tests/distributed/test_zero.py``
runs FALQON under ZeRO-3.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
import torch.distributed as tdist
from transformers import AutoModelForCausalLM

from falqon_dist.baselines.config import LoraConfig
from falqon_dist.data.collate import Collator
from falqon_dist.data.tokenization import IGNORE_INDEX, tokenize_record
from falqon_dist.distributed import initialize
from falqon_dist.fp8.backends import EmulatedBackend
from falqon_dist.fp8.formats import FP8_MAX
from falqon_dist.method import FalqonConfig
from falqon_dist.methods import prepare_model
from falqon_dist.models import build_tiny_model, build_tiny_tokenizer
from falqon_dist.train.loss import accumulate_step

#: Responses of 2, 5, 12 and 20 target tokens (with the EOS).
RESPONSES = ["a", "dcba", "hello world", "the quick brown fox"]
#: Every example of the ``same-length`` set is this many tokens long.
SAME_LENGTH = 32
#: ``falqon-pow2``: FALQON with its dynamic FP8 casts' scales rounded up to a power of two (:func:`pow2_casts`).
METHODS = {"lora": LoraConfig(rank=8), "falqon": FalqonConfig(rank=8, backend="emulated"),
           "falqon-pow2": FalqonConfig(rank=8, backend="emulated")}  # fmt: skip
#: ‖g − ref‖₂ / ‖ref‖₂ allowed: float32 rounding.
TOL = 1e-5
#: The methods compared under ZeRO-3 (why not FALQON: the module docstring).
AT_ZERO3 = {"lora"}


@contextlib.contextmanager
def pow2_casts(enabled: bool) -> Iterator[None]:
    """With ``enabled``, the emulated backend's dynamic casts take ``s = 2^⌈log₂(amax/F)⌉`` instead of
    ``amax/F``: x/s is then exact and ``Q(x/s)·s`` depends on x alone (for every x in FP8's normal
    range), no longer on the rows that share its micro-batch."""
    if not enabled:
        yield
        return
    original = EmulatedBackend.quantize

    def quantize(self, x_hp, fp8_dtype, *, transpose=False):
        fmax = FP8_MAX[fp8_dtype]
        amax = x_hp.detach().abs().amax().float().clamp(min=torch.finfo(torch.float32).tiny)
        scale = torch.exp2(torch.ceil(torch.log2(amax / fmax))).reshape(1)
        x_fp8 = (x_hp.float() / scale).clamp(-fmax, fmax).to(fp8_dtype)
        return x_fp8, scale, (x_fp8.t() if transpose else None)

    EmulatedBackend.quantize = quantize
    try:
        yield
    finally:
        EmulatedBackend.quantize = original


def examples(padded: bool) -> list[dict[str, list[int]]]:
    """The 4 examples; ``padded``: prompts of different lengths (micro-batches are right-padded),
    else every example SAME_LENGTH tokens long."""
    tokenizer = build_tiny_tokenizer()
    out = []
    for index, response in enumerate(RESPONSES):
        # BOS, "copy(", the fill, ")=", the response, EOS: one token each character
        fill = 3 + 7 * index if padded else SAME_LENGTH - 9 - len(response)
        prompt = "copy(" + "".join(chr(ord("a") + (index + i) % 26) for i in range(fill)) + ")="
        out.append(tokenize_record({"prompt": prompt, "response": response}, tokenizer, 128)[0])
    targets = [sum(label != IGNORE_INDEX for label in example["labels"]) for example in out]
    assert targets == [len(r) + 1 for r in RESPONSES], targets
    sizes = {len(example["input_ids"]) for example in out}
    assert (len(sizes) == len(out)) if padded else (sizes == {SAME_LENGTH}), sizes
    return out


def build(method: str) -> torch.nn.Module:
    """The tiny model (float32) with ``method`` applied, the same on every rank and in every build."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(), dtype=torch.float32)
    prepare_model(model, METHODS[method])
    if method == "lora":
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat(grads) -> torch.Tensor:
    return torch.cat([g.detach().float().reshape(-1).cpu() for g in grads])


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over positions t with labels[t+1] != IGNORE_INDEX of -log p(labels[t+1]), written out."""
    logp = torch.log_softmax(logits.float(), dim=-1)[..., :-1, :]
    targets = labels[..., 1:]
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * (targets != IGNORE_INDEX)).sum()


def targets_of(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def global_reference(method: str, items) -> torch.Tensor:
    """∇ (Σ token losses of the examples, each forwarded alone, unpadded / their target count)."""
    model = build(method)
    labels = [torch.tensor([item["labels"]]) for item in items]
    total = sum(token_losses(model(input_ids=torch.tensor([item["input_ids"]])).logits, label)
                for item, label in zip(items, labels))  # fmt: skip
    (total / sum(targets_of(label) for label in labels)).backward()
    return flat(p.grad for p in trainable(model))


def layout(items, micro: int, accum: int, world: int) -> list[list[dict[str, torch.Tensor]]]:
    """Every rank's micro-batches: rank r's m-th holds examples (r*accum + m)*micro ... + micro."""
    collate = Collator(build_tiny_tokenizer().pad_token_id)
    assert micro * accum * world == len(items)
    return [[collate(items[(r * accum + m) * micro:(r * accum + m + 1) * micro]) for m in range(accum)]
            for r in range(world)]  # fmt: skip


def partition_reference(method: str, batches) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Plain torch over every rank's micro-batches (the same collated tensors), in one process:
    (∇ Σ token losses / N, ∇ of the mean of the micro-batches' mean losses, Σ token losses / N)."""
    model = build(method)
    sums, counts = [], []
    for batch in (batch for rank in batches for batch in rank):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums.append(token_losses(logits, batch["labels"]))
        counts.append(targets_of(batch["labels"]))
    loss = sum(sums) / sum(counts)
    grad = torch.autograd.grad(loss, trainable(model), retain_graph=True)
    old = torch.autograd.grad(
        sum(s / c for s, c in zip(sums, counts)) / len(sums), trainable(model)
    )
    return flat(grad), flat(old), float(loss)


def ds_config(stage: int, micro: int, accum: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-3, "weight_decay": 0.0, "torch_adam": True},
        },
    }


def deepspeed_gradient(
    method: str, stage: int, micro: int, accum: int, batches
) -> tuple[torch.Tensor, float]:
    """(the full trainable gradient at the accumulation boundary, the step's loss from the sums)."""
    from deepspeed.utils import safe_get_full_grad

    linear = torch.nn.functional.linear  # ZeRO-3 replaces it for good (memory_efficient_linear)
    engine = initialize(build(method), ds_config(stage, micro, accum))
    sums = accumulate_step(engine, batches[tdist.get_rank()])
    assert (
        engine.is_gradient_accumulation_boundary()
    )  # the boundary backward ran; no optimizer step yet
    grads = [p.grad if stage == 0 else safe_get_full_grad(p) for p in trainable(engine.module)]
    assert all(g is not None for g in grads), (
        f"{method} zero{stage}: a trainable parameter has no gradient"
    )
    totals = torch.stack([sums.loss, sums.targets.double()])
    tdist.all_reduce(totals)
    assert int(totals[1]) == int(sums.global_targets), (totals, sums.global_targets)
    engine.destroy()
    torch.nn.functional.linear = linear  # the references stay plain torch
    return flat(grads), float(totals[0] / totals[1])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def say(line: str) -> None:
    if tdist.get_rank() == 0:
        print(line, flush=True)


def main(layouts: str, stages: str) -> None:
    tdist.init_process_group("gloo")
    world = tdist.get_world_size()
    shapes = [tuple(int(v) for v in item.split("x")) for item in layouts.split(",")]
    for name, padded in (("same-length", False), ("padded", True)):
        items = examples(padded)
        for method in METHODS:
            global_check = method == "lora" or (method == "falqon-pow2" and not padded)
            if method == "falqon-pow2" and padded:
                continue  # the native casts cover the padded partitions
            with pow2_casts(method == "falqon-pow2"):
                reference = global_reference(method, items)
                for micro, accum in shapes:
                    batches = layout(items, micro, accum, world)
                    partition, old, loss_ref = partition_reference(method, batches)
                    for stage in (
                        int(s) for s in stages.split(",") if int(s) != 3 or method in AT_ZERO3
                    ):
                        tag, tol = f"{name}-{method}-zero{stage}-{micro}x{accum}", TOL
                        grad, loss = deepspeed_gradient(method, stage, micro, accum, batches)
                        to_partition, to_global, old_off = (relative(grad, partition), relative(grad, reference),
                                                            relative(old, partition))  # fmt: skip
                        say(
                            f"DIFF {tag} world={world} partition={to_partition:.2e} global={to_global:.2e} "
                            f"old_normalization={old_off:.2e} loss={loss:.7f} loss_ref={loss_ref:.7f}"
                        )
                        assert to_partition <= tol, (tag, to_partition)
                        say(f"CHECK {tag} matches-partition-reference ok")
                        if global_check:
                            assert to_global <= tol, (tag, to_global)
                            say(f"CHECK {tag} matches-global-reference ok")
                        if micro < len(items):
                            assert old_off >= 10 * tol, (tag, old_off)
                            say(f"CHECK {tag} old-normalization-fails ok")
                        assert abs(loss - loss_ref) <= 1e-5 * loss_ref, (tag, loss, loss_ref)
                        say(f"CHECK {tag} record-loss ok")
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
