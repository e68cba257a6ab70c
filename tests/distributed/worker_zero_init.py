"""2-rank ZeRO-3 loading: ``from_pretrained`` under zero.Init, then layer-by-layer conversion.

Checks that no rank holds a full linear after loading and converting (every parameter is a
partition), that the converted FP8 bytes equal a single-process conversion of the same checkpoint,
that scales are float32, and that the result trains through ``initialize``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as tdist
from transformers import AutoModelForCausalLM

import falqon_dist as fd
from falqon_dist.distributed.zero3_init import load_pretrained_zero3
from tests.distributed.worker_zero import (
    batch,
    build_engine,
    ds_config,
    full_qweights,
    optimizer_step,
    say,
    tiny_llama,
)

CFG = fd.FalqonConfig(rank=8, backend="emulated")

if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    model_dir = Path(sys.argv[1])
    if tdist.get_rank() == 0:
        tiny_llama().to(torch.bfloat16).save_pretrained(model_dir)
    tdist.barrier()

    config = ds_config(3, bf16=True)
    model, names = load_pretrained_zero3(model_dir, config, CFG, dtype=torch.bfloat16)
    assert len(names) == 14, names
    world = tdist.get_world_size()
    for name, param in model.named_parameters():
        assert hasattr(param, "ds_id"), f"{name} is not partitioned"
        assert param.data.numel() == 0, f"{name} is resident on rank {tdist.get_rank()}"
        assert param.ds_tensor.numel() == -(-param.ds_numel // world), name
    for _, layer in fd.falqon_layers(model):
        assert layer.scale.dtype == torch.float32
    say("zero-init partitioned-after-conversion")

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    fd.convert_model(reference, CFG)
    for (_, ref), full in zip(fd.falqon_layers(reference), full_qweights(model)):
        assert torch.equal(ref.qweight, full), (
            "sharded conversion differs from single-process conversion"
        )
    say("zero-init bytes-match-single-process")

    engine, hook = build_engine(model, config, CFG)
    merges = []
    for micro in range(4):
        ids = batch(micro)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        merges.append(optimizer_step(engine, hook))
    assert engine.global_steps == 2 and [m is not None for m in merges] == [
        False,
        True,
        False,
        True,
    ]
    assert merges[-1].to_dict()["rows_merged"] > 0
    say("zero-init trains")
    tdist.barrier()
