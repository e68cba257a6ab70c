"""2-rank checks of ``export_fp8`` on a ZeRO-3 engine (bf16). Run by test_export_zero3.py via torchrun.

After a few training steps, every rank calls ``export_fp8(engine, out)``. Checks:

* ``only-rank0-writes``: rank 0 creates the one staging directory and shard writer, rank 1 none;
* ``module-by-module``: while exporting, the parameters resident at once (ZeRO status AVAILABLE,
  sampled inside every gather the exporter opens) never exceed the largest single module's own
  parameters: no rank ever holds the whole model;
* ``bitwise-single-process``: the files equal those of a non-partitioned copy of the same weights
  (gathered with ``GatheredParameters``) exported by ``export_fp8`` too;
* ``trains-after-export``: the engine still steps and stays partitioned afterwards.

Rank 0 prints ``CHECK export-zero3 <name> ok`` lines that the test looks for.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as tdist
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

import falqon_dist as fd
from falqon_dist.export import export_fp8, exporter
from tests.distributed.worker_zero import (
    RANK_CFG,
    batch,
    build_engine,
    ds_config,
    optimizer_step,
    tiny_llama,
)


def say(name: str) -> None:
    if tdist.get_rank() == 0:
        print(f"CHECK export-zero3 {name} ok", flush=True)


def all_ranks(value):
    gathered = [None] * tdist.get_world_size()
    tdist.all_gather_object(gathered, value)
    return gathered


def train_steps(engine, hook, steps: int, offset: int = 0) -> dict[str, int]:
    """``steps`` optimizer steps, each merged by the hook; the last merge's statistics."""
    last = None
    for micro in range(steps * engine.gradient_accumulation_steps()):
        ids = batch(offset + micro)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        last = optimizer_step(engine, hook) or last
    return last.to_dict()


def resident_numel(model) -> int:
    """Elements of ``model``'s ZeRO-3 parameters currently gathered (full data present)."""
    return sum(p.ds_numel for p in model.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE)


@contextlib.contextmanager
def instrumented_export(model):
    """Patch the exporter to count staging dirs / writers and sample resident parameters in gathers."""
    record = {"staged": 0, "writers": 0, "peak_resident": 0, "gathers": 0}
    originals = exporter.gathered, exporter.ShardWriter, exporter.StagedDirectory

    @contextlib.contextmanager
    def gathered(params, *, modify=False):
        with originals[0](params, modify=modify):
            record["gathers"] += 1
            record["peak_resident"] = max(record["peak_resident"], resident_numel(model))
            yield

    class CountingWriter(originals[1]):
        def __init__(self, *args, **kwargs):
            record["writers"] += 1
            super().__init__(*args, **kwargs)

    class CountingStaging(originals[2]):
        def __init__(self, *args, **kwargs):
            record["staged"] += 1
            super().__init__(*args, **kwargs)

    exporter.gathered, exporter.ShardWriter, exporter.StagedDirectory = (
        gathered,
        CountingWriter,
        CountingStaging,
    )
    try:
        yield record
    finally:
        exporter.gathered, exporter.ShardWriter, exporter.StagedDirectory = originals


def single_process_copy(module) -> torch.nn.Module:
    """A non-partitioned model holding exactly ``module``'s (gathered) parameters and buffers."""
    reference = tiny_llama()
    fd.convert_model(reference, RANK_CFG)
    # what DeepSpeed's bf16 mode does (uint8 codes and fp32 scales stay)
    reference.to(torch.bfloat16)
    ref_params = dict(reference.named_parameters())
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            target = ref_params[name]
            assert target.dtype == param.dtype and target.shape == param.shape, name
            target.data.copy_(param.data)
    ref_buffers = dict(reference.named_buffers())
    for name, buffer in module.named_buffers():
        ref_buffers[name].data.copy_(buffer.data)
    return reference


def file_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def main(out_root: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = tdist.get_rank()
    model = tiny_llama()
    fd.convert_model(model, RANK_CFG)
    engine, hook = build_engine(model, ds_config(3, True))
    train_steps(engine, hook, 2)
    module = engine.module
    assert all(hasattr(p, "ds_id") for p in module.parameters())

    largest_module = max(
        sum(p.ds_numel for p in m.parameters(recurse=False)) for m in module.modules()
    )
    total = sum(p.ds_numel for p in module.parameters())
    resident_before = resident_numel(module)
    out = out_root / "zero3"
    with instrumented_export(module) as record:
        returned = export_fp8(engine, out)  # the engine itself: unwrapped to the HF model inside
    assert returned == out

    # only rank 0 stages and writes; every rank took part in the same gathers
    records = all_ranks(record)
    assert [r["staged"] for r in records] == [1, 0] and [r["writers"] for r in records] == [1, 0], (
        records
    )
    assert len({r["gathers"] for r in records}) == 1 and records[0]["gathers"] > 0, records
    leftovers = [p.name for p in out_root.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"staging leftovers: {leftovers}"
    say("only-rank0-writes")

    # module by module: never more resident than the largest module's own parameters
    assert resident_before == 0, f"{resident_before} elements resident before export"
    for r in records:
        assert 0 < r["peak_resident"] <= largest_module < total, (r, largest_module, total)
    assert resident_numel(module) == 0, "parameters left gathered after export"
    say("module-by-module")
    if rank == 0:
        print(
            f"peak resident during export: {records[0]['peak_resident']} of {total} elements "
            f"(largest module {largest_module})",
            flush=True,
        )

    # bit-identical to a single-process export of the same weights (every rank calls export_fp8: it
    # broadcasts rank 0's checks; the copy is not partitioned, so nothing is gathered)
    reference = single_process_copy(module)
    export_fp8(reference, out_root / "single")
    if rank == 0:
        got, want = file_digests(out), file_digests(out_root / "single")
        assert got == want, (got, want)
        assert set(got) >= {"config.json", "model.safetensors"}, got
        from safetensors.torch import load_file

        tensors = load_file(str(out / "model.safetensors"))
        for name, layer in fd.falqon_layers(reference):
            codes = tensors[f"{name}.weight"].view(torch.uint8)
            assert torch.equal(codes, layer.qweight[: layer.out_features]), name
    tdist.barrier()
    say("bitwise-single-process")

    stats = train_steps(engine, hook, 1, offset=100)
    assert engine.global_steps == 3 and stats["rows_merged"] > 0
    assert resident_numel(module) == 0 and all(p.data.numel() == 0 for p in module.parameters())
    say("trains-after-export")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    tdist.barrier()
    tdist.destroy_process_group()
