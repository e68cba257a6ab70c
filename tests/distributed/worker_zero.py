"""2-rank checks of FALQON under one ZeRO stage (bf16 off and on). Run by test_zero.py via torchrun.

Each check raises on failure; rank 0 prints ``CHECK <name> ok`` lines that the test looks for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys

import deepspeed
import torch
import torch.distributed as tdist

import falqon_dist as fd
from falqon_dist.distributed import initialize
from falqon_dist.method.merge_math import MergeStats
from falqon_dist.method.proxy import select_rows
from falqon_dist.methods import post_optimizer_hook
from tests.models import tiny_llama  # seeded: identical weights on every rank

# the paper: B zeroed by every merge
RANK_CFG = fd.FalqonConfig(rank=8, backend="emulated", merge="paper")
GRAD_ACCUM = 2


def build_engine(model, config: dict, falqon: fd.FalqonConfig = RANK_CFG):
    """DeepSpeed's engine for a converted model and FALQON's post-optimizer hook, as the trainer builds them."""
    engine = initialize(model, config)
    return engine, post_optimizer_hook(falqon, engine.module, engine.optimizer)


def optimizer_step(engine, hook) -> MergeStats | None:
    """``engine.step()``, then the merge when the engine's step counter advanced (the trainer's loop)."""
    steps = engine.global_steps
    engine.step()
    return hook(engine.global_steps) if engine.global_steps > steps else None


def ds_config(stage: int, bf16: bool, **extra) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": GRAD_ACCUM,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": bf16},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 5e-2, "weight_decay": 0.0, "torch_adam": True},
        },
    }
    cfg.update(extra)
    return cfg


def say(name: str) -> None:
    if tdist.get_rank() == 0:
        print(f"CHECK {name} ok", flush=True)


def full_qweights(model) -> list[torch.Tensor]:
    """Every layer's full qweight bytes (gathered under ZeRO-3), as CPU copies."""
    out = []
    for _, layer in fd.falqon_layers(model):
        params = [layer.qweight] if hasattr(layer.qweight, "ds_id") else []
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            out.append(layer.qweight.detach().clone().cpu())
    return out


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def assert_same_on_all_ranks(value: str, what: str) -> None:
    gathered = [None] * tdist.get_world_size()
    tdist.all_gather_object(gathered, value)
    assert len(set(gathered)) == 1, f"{what} differs across ranks: {gathered}"


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + tdist.get_rank())  # different data per rank
    return torch.randint(0, 128, (2, 16), generator=g)


def check_training(stage: int, bf16: bool) -> None:
    model = tiny_llama()
    fd.convert_model(model, RANK_CFG)
    scales = [layer.scale.clone() for _, layer in fd.falqon_layers(model)]
    engine, hook = build_engine(model, ds_config(stage, bf16))
    # DeepSpeed's own engine: the merge is the hook's
    assert type(engine).__name__ == "DeepSpeedEngine"
    tag = f"stage{stage}-bf16={bf16}"
    layers = [layer for _, layer in fd.falqon_layers(engine.module)]

    for layer, scale in zip(layers, scales):
        assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, scale), (
            f"{tag}: scale was cast"
        )
    if stage == 3:
        world = tdist.get_world_size()
        for layer in layers:
            q = layer.qweight
            assert q.ds_tensor.dtype == torch.uint8, f"{tag}: partition dtype {q.ds_tensor.dtype}"
            expected = -(-q.ds_numel // world)
            assert q.ds_tensor.numel() == expected, (
                f"{tag}: partition {q.ds_tensor.numel()} != {expected}"
            )
            assert q.data.numel() == 0, f"{tag}: qweight resident outside forward"
        say(f"{tag} partition-sizes")

    before = digest(full_qweights(engine.module))
    merges = 0
    for micro in range(3 * GRAD_ACCUM):
        ids = batch(micro)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        merged = optimizer_step(engine, hook)
        now = digest(full_qweights(engine.module))
        assert (merged is not None) == boundary, (
            f"{tag}: the step counter advanced off a boundary (micro {micro})"
        )
        if not boundary:
            assert now == before, f"{tag}: backbone changed between micro-batches (micro {micro})"
            continue
        merges += 1
        stats = merged.to_dict()
        assert stats and stats["rows_merged"] > 0 and stats["layers"] == len(layers), (
            f"{tag}: {stats}"
        )
        assert now != before, f"{tag}: merge did not change the backbone"
        assert_same_on_all_ranks(now, f"{tag} qweight digest after merge {merges}")
        for layer in layers:
            master = hook.masters.read_full(layer.B)
            assert not master.any(), f"{tag}: fp32 master of B not zeroed"
            local = layer.B.ds_tensor if hasattr(layer.B, "ds_id") else layer.B
            assert not local.any(), f"{tag}: B not zeroed"
            assert layer.scale.dtype == torch.float32 and torch.equal(
                layer.scale, scales[layers.index(layer)]
            )
        before = now
    assert merges == 3 and engine.global_steps == 3
    say(f"{tag} accumulation-boundaries")
    say(f"{tag} replica-identity")
    say(f"{tag} master-zeroed")
    check_merge_bytes(engine, hook, tag, "paper")
    check_merge_bytes(engine, hook, tag, "paper", rounding="stochastic", proxy_scale=0.02, step=5)
    check_merge_bytes(engine, hook, tag, "topk_keep", step=6)
    check_merge_bytes(
        engine, hook, tag, "topk_keep", rounding="stochastic", proxy_scale=0.02, step=9
    )
    check_merge_bytes(engine, hook, tag, "topk_carry", proxy_scale=0.02, step=7)
    check_merge_bytes(engine, hook, tag, "every_row", proxy_scale=0.02, step=8)
    check_nonfinite(engine, hook, tag)


def nan_codes(tensors: list[torch.Tensor]) -> int:
    """E4M3 NaN codes (0x7F / 0xFF) in these uint8 tensors."""
    return sum(int(((t & 0x7F) == 0x7F).sum()) for t in tensors)


def set_master(hook, layer, full: torch.Tensor) -> None:
    """Put ``full`` into B's fp32 master (what an optimizer step that diverged leaves there), by
    DeepSpeed's own accessors where they hold it (not through the masters under test)."""
    from deepspeed.utils import safe_set_full_fp32_param

    if hasattr(layer.B, "ds_id") or hasattr(layer.B, "_hp_mapping"):
        safe_set_full_fp32_param(layer.B, full)
    else:
        hook.masters._unfused.get(id(layer.B), layer.B).data.copy_(full)


def set_merge(layer, merge: str, rounding: str = "nearest") -> None:
    """Switch a layer's merge recipe (and rounding) for the next merges."""
    layer.config = dataclasses.replace(layer.config, merge=merge, merge_rounding=rounding)


def check_nonfinite(engine, hook, tag: str) -> None:
    """Nothing non-finite reaches the FP8 backbone through the engine at any stage.

    1. A NaN loss (so NaN gradients) through engine.backward/step: whoever stops it (DeepSpeed's
       overflow check, or our merge guard), the backbone bytes hold no NaN code and stay the same
       on every rank, and B's master stays finite.
    2. NaN and inf in B's fp32 master at a merge (top-k and every row): the rows holding them keep
       their bytes, the event is counted, B's master is zeroed there, equally on every rank."""
    layers = [layer for _, layer in fd.falqon_layers(engine.module)]
    for micro in range(GRAD_ACCUM):
        ids = batch(100 + micro)
        engine.backward(engine(input_ids=ids, labels=ids).loss * float("nan"))
        optimizer_step(engine, hook)
    after = full_qweights(engine.module)
    assert nan_codes(after) == 0, f"{tag}: a NaN gradient put NaN codes into the backbone"
    assert_same_on_all_ranks(digest(after), f"{tag} qweight digest after a NaN gradient")
    for layer in layers:
        assert torch.isfinite(hook.masters.read_full(layer.B)).all(), (
            f"{tag}: NaN gradient reached B's master"
        )

    for merge in ("paper", "every_row"):
        for layer in layers:
            set_merge(layer, merge)
            poisoned = torch.zeros(layer.out_features, layer.rank)
            poisoned[3, 1], poisoned[5, 0] = float("nan"), float("inf")
            poisoned[[3, 5], 2:] = 0.5  # large rows: the top-k takes them
            set_master(hook, layer, poisoned)
        before = full_qweights(engine.module)
        stats = hook(3).to_dict()
        after = full_qweights(engine.module)
        assert nan_codes(after) == 0 and stats["nonfinite"] > 0, f"{tag} merge={merge}: {stats}"
        for old, new, layer in zip(before, after, layers):
            assert torch.equal(old[[3, 5]], new[[3, 5]]), (
                f"{tag} merge={merge}: a non-finite row was written"
            )
            master = hook.masters.read_full(layer.B)
            assert torch.isfinite(master).all() and not master[[3, 5]].any(), (
                f"{tag} merge={merge}: B master"
            )
        assert_same_on_all_ranks(
            digest(after), f"{tag} qweight digest after a non-finite merge (merge={merge})"
        )
        for layer in layers:
            set_merge(layer, "paper")
            hook.masters.zero_(layer.B)
    say(f"{tag} nonfinite-never-reaches-the-backbone")


def check_merge_bytes(
    engine,
    hook,
    tag: str,
    merge: str,
    rounding: str = "nearest",
    proxy_scale: float = 0.5,
    step: int = 0,
) -> None:
    """The distributed merge (the hook: ``merge_model_`` over DeepSpeed's masters) writes exactly the
    bytes a single-process merge writes for the same B, for recipe ``merge`` (with stochastic
    rounding too: small proxies, so the noise decides many elements). Afterwards B's fp32 master
    holds exactly the reference's B: zeros (``paper``), the unmerged rows (``topk_keep``), and with a
    carry (``topk_carry``, small proxies: much is rounded away) the carried merged rows too. With
    ``every_row`` every row is merged; under ZeRO-3 each rank merges its slice without gathering W
    and the carry of rows split between slices is summed over the ranks, so the master equals the
    reference's carry up to float rounding of that sum (and is the same on every rank)."""
    reference = tiny_llama()
    fd.convert_model(reference, RANK_CFG)
    dist_layers = [layer for _, layer in fd.falqon_layers(engine.module)]
    ref_layers = [layer for _, layer in fd.falqon_layers(reference)]
    for ref, full in zip(ref_layers, full_qweights(engine.module)):
        ref.qweight.data.copy_(full)
    for layer in (*dist_layers, *ref_layers):
        set_merge(layer, merge, rounding)
    g = torch.Generator().manual_seed(7)  # the same proxies on every rank
    proxies = [
        torch.randn(layer.out_features, layer.rank, generator=g) * proxy_scale
        for layer in ref_layers
    ]
    for layer, proxy in zip(dist_layers, proxies):
        set_master(hook, layer, proxy)

    before = [full.clone() for full in full_qweights(engine.module)]
    stats = hook(step).to_dict()
    ref_stats = {"rows_merged": 0, "saturated": 0}
    for layer, proxy in zip(ref_layers, proxies):
        s = layer.merge_proxy_(proxy, step=step).to_dict()
        ref_stats = {k: ref_stats[k] + s[k] for k in ref_stats}
        assert (
            merge == "every_row"
            or len(select_rows(proxy, layer.rows_per_merge)) == layer.rows_per_merge
        )
    for ref, full in zip(ref_layers, full_qweights(engine.module)):
        assert torch.equal(ref.qweight, full), (
            f"{tag}: {merge} {rounding} merge bytes differ from the reference"
        )
    assert stats["rows_merged"] == ref_stats["rows_merged"], (stats, ref_stats)
    assert stats["saturated"] == ref_stats["saturated"], (stats, ref_stats)
    changed = sum(int((a != b).sum()) for a, b in zip(before, full_qweights(engine.module)))
    assert changed > 0, f"{tag}: the {merge} {rounding} merge changed nothing"
    for dist_layer, ref in zip(dist_layers, ref_layers):
        master = hook.masters.read_full(dist_layer.B)
        assert_same_on_all_ranks(digest([master]), f"{tag}: B master after a merge")
        if merge == "every_row":
            carried = torch.allclose(master, ref.B.detach().float(), rtol=1e-5, atol=1e-6)
            assert carried, f"{tag}: carry of an all-rows merge"
        else:
            assert torch.equal(master, ref.B.detach().float()), (
                f"{tag}: B master after a merge={merge} merge"
            )
        if ref.carry_residual:  # every merged row got back what rounding dropped from it
            assert master.ne(0).any(dim=1).all(), f"{tag}: a merged row carried nothing back"
        elif merge == "topk_keep":
            assert master.any() and (
                master.ne(0).any(dim=1).sum() == ref.out_features - ref.rows_per_merge
            )
        else:
            assert not master.any(), f"{tag}: the paper's merge left something in B's master"
        set_merge(dist_layer, "paper")
        hook.masters.zero_(dist_layer.B)
    say(
        f"{tag} {'' if rounding == 'nearest' else rounding + '-'}{merge}-merge-bytes-match-reference"
    )


if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    stage = int(sys.argv[1])
    for bf16 in (False, True):
        check_training(stage, bf16)
    tdist.barrier()
    tdist.destroy_process_group()
