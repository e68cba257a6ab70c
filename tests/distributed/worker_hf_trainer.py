"""FalqonCallback in a transformers.Trainer running DeepSpeed ZeRO-``stage`` on 2 gloo ranks.

    torchrun --nproc_per_node 2 worker_hf_trainer.py STAGE OUT_DIR

Prints ``CHECK hf-trainer <name> ok`` for: ``merged`` (the backbone changed at every step: the
callback's merge ran and counted rows), ``same-on-every-rank`` (the FP8 bytes, gathered under
ZeRO-3, are identical across ranks), ``master-reset`` (B's fp32 master, where DeepSpeed's optimizer
keeps it, holds only the carry the merge put back: smaller than one step's update, and equal to the
parameter), ``exported`` (the FP8 export written at the end loads with transformers).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
from accelerate import PartialState
from transformers import Trainer, TrainerCallback, TrainingArguments

import falqon_dist as fd
from falqon_dist.distributed.proxies import ProxyMasters
from falqon_dist.export.exporter import gathered
from falqon_dist.integrations import FalqonCallback
from tests.models import tiny_llama
from tests.unit.test_integrations import Repeated

STEPS = 4


class MasterProbe(TrainerCallback):
    """At the end of training, before FalqonCallback exports (it comes first in the list): every
    B's fp32 master, where DeepSpeed's optimizer keeps it, equals the parameter and holds only the
    carry of the last merge (below one step's update, ``lr``); without the reset it would hold the
    sum of every step's update."""

    checked = False

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        masters = ProxyMasters(optimizer.optimizer)  # accelerate's wrapper -> DeepSpeed's optimizer
        for name, layer in fd.falqon_layers(model):
            master = masters.read_full(layer.B).cpu()
            with gathered([layer.B]):
                param = layer.B.detach().float().cpu().reshape(master.shape)
            assert torch.allclose(master, param, atol=1e-6), (
                name,
                float((master - param).abs().max()),
            )
            assert 0 < master.abs().max() < args.learning_rate, (name, float(master.abs().max()))
        self.checked = True


def main(stage: int, out: Path) -> None:
    model = tiny_llama()
    fd.convert_model(model, fd.FalqonConfig(rank=4, backend="emulated"))
    initial = {name: layer.qweight.detach().clone() for name, layer in fd.falqon_layers(model)}
    ds_config = {
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4,
        "gradient_clipping": "auto",
        "steps_per_print": 10**9,
    }
    # accelerate runs DeepSpeed only on an accelerator device; on CPU ranks it needs the state set up
    # the way `accelerate launch` would (DeepSpeed, gloo), which the Trainer then reuses.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        deepspeed=ds_config,
        accelerator_config={"use_configured_state": True},
    )
    callback = FalqonCallback(export_dir=out / "fp8")
    probe = MasterProbe()
    trainer = Trainer(model=model, args=args, train_dataset=Repeated(), callbacks=[probe, callback])
    trainer.train()
    rank = tdist.get_rank()

    merged = [
        e["falqon/rows_merged"] for e in trainer.state.log_history if "falqon/rows_merged" in e
    ]
    assert len(merged) == STEPS and all(m > 0 for m in merged), trainer.state.log_history
    layers = fd.falqon_layers(model)
    with gathered([layer.qweight for _, layer in layers]):
        changed = sum(int((layer.qweight.cpu() != initial[name]).sum()) for name, layer in layers)
        bits = torch.cat(
            [layer.qweight.detach().reshape(-1).cpu().to(torch.int64) for _, layer in layers]
        )
    assert changed > 0
    print(f"CHECK hf-trainer merged ok (rank {rank}: {changed} bytes changed)", flush=True)
    everyone = [torch.zeros_like(bits) for _ in range(tdist.get_world_size())]
    tdist.all_gather(everyone, bits)
    assert all(torch.equal(other, everyone[0]) for other in everyone)
    print("CHECK hf-trainer same-on-every-rank ok", flush=True)

    assert probe.checked
    print("CHECK hf-trainer master-reset ok", flush=True)

    tdist.barrier()
    if rank == 0:
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        loaded = AutoModelForCausalLM.from_pretrained(
            out / "fp8", quantization_config=CompressedTensorsConfig(dequantize=True)
        )
        assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
        print("CHECK hf-trainer exported ok", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
