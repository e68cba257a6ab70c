"""2-rank checkpoint round trip under one ZeRO stage. Run by test_checkpoint.py via torchrun.

Train 2 optimizer steps, save, train steps 3 and 4 (the "uninterrupted" run). A fresh engine built
from a differently initialized model loads the checkpoint and trains steps 3 and 4 on the same data:
FP8 bytes, scales, B, optimizer state (step 4's loss depends on step 3's Adam update), step counter
and RNG must come back exactly, so the losses are bit-identical (same kernels, same inputs, same
state, same reduction order on gloo): tolerance zero.
"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as tdist

import falqon_dist as fd
from falqon_dist.distributed import checkpoint
from tests.distributed.worker_zero import (
    batch,
    build_engine,
    digest,
    ds_config,
    full_qweights,
    optimizer_step,
    say,
    tiny_llama,
)


def build(stage: int, init: str):
    """The engine and FALQON's merge hook (the default recipe, every_row: B holds the carry, which the
    checkpoint must bring back too)."""
    model = tiny_llama()
    config = fd.FalqonConfig(rank=8, backend="emulated", init=init)
    fd.convert_model(model, config)
    return build_engine(model, ds_config(stage, bf16=True), config)


def step(engine, hook, index: int) -> list[float]:
    losses = []
    for micro in range(2):
        ids = batch(10 * index + micro)
        noise = torch.rand(1).item()  # consumes the RNG: a restored RNG must give the same value
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        optimizer_step(engine, hook)
        losses += [loss.item(), noise]
    return losses


if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    stage, ckpt_dir = int(sys.argv[1]), Path(sys.argv[2])
    tag = f"stage{stage}"

    engine, hook = build(stage, "svd")
    for i in range(2):
        step(engine, hook, i)
    saved_tag = checkpoint.save(
        engine, ckpt_dir, step=engine.global_steps, client_state={"data_position": 2}
    )
    assert checkpoint.latest_tag(ckpt_dir) == saved_tag
    saved_bytes = digest(full_qweights(engine.module))
    expected = step(engine, hook, 2) + step(engine, hook, 3)

    resumed, resumed_hook = build(stage, "random")  # different bytes before loading
    assert digest(full_qweights(resumed.module)) != saved_bytes
    loaded_tag, client_state = checkpoint.load(resumed, ckpt_dir)
    assert loaded_tag == saved_tag and client_state["data_position"] == 2, client_state
    assert resumed.global_steps == 2, resumed.global_steps
    assert digest(full_qweights(resumed.module)) == saved_bytes, f"{tag}: FP8 bytes not restored"
    for (_, a), (_, b) in zip(fd.falqon_layers(engine.module), fd.falqon_layers(resumed.module)):
        assert a.scale.dtype == torch.float32 and torch.equal(a.scale, b.scale), (
            f"{tag}: scale not restored"
        )
    got = step(resumed, resumed_hook, 2) + step(resumed, resumed_hook, 3)
    assert got == expected, f"{tag}: resumed step differs: {got} vs {expected}"
    say(f"{tag} checkpoint-round-trip")
    # rank 0's view of the directory decides on every rank: re-saving the latest step is refused on
    # both, and what a crashed save of a later step left is cleared before that step is written
    try:
        checkpoint.save(engine, ckpt_dir, step=2)
    except checkpoint.CheckpointWriteError as error:
        assert "already exists and is the latest" in str(error), error
    else:
        raise AssertionError(
            f"rank {tdist.get_rank()}: re-saving the latest checkpoint was not refused"
        )
    leftover = ckpt_dir / checkpoint.tag_for(5)
    if tdist.get_rank() == 0:
        leftover.mkdir()
        (leftover / "stale_from_a_crash").write_text("x")
    tdist.barrier()
    checkpoint.save(engine, ckpt_dir, step=5)
    assert (
        not (leftover / "stale_from_a_crash").exists()
        and checkpoint.latest_tag(ckpt_dir) == leftover.name
    )
    say(f"{tag} checkpoint-rank0-decides")
    tdist.barrier()
