"""2-rank checks of FALQON under one ZeRO stage (bf16 off and on). Run by test_zero.py via torchrun.

Each check raises on failure; rank 0 prints ``CHECK <name> ok`` lines that the test looks for.
"""

from __future__ import annotations

import hashlib
import sys

import deepspeed
import torch
import torch.distributed as tdist

import falqon_dist as fd
from falqon_dist.distributed import initialize
from falqon_dist.method.proxy import select_rows
from tests.models import tiny_llama  # seeded: identical weights on every rank

RANK_CFG = fd.FalqonConfig(rank=8, backend="emulated", topk=None, unmerged="discard")  # the paper: B zeroed by every merge
GRAD_ACCUM = 2


def ds_config(stage: int, bf16: bool, **extra) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": GRAD_ACCUM,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "AdamW", "params": {"lr": 5e-2, "weight_decay": 0.0, "torch_adam": True}},
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
    engine = initialize(model, ds_config(stage, bf16))
    tag = f"stage{stage}-bf16={bf16}"
    layers = [layer for _, layer in fd.falqon_layers(engine.module)]

    for layer, scale in zip(layers, scales):
        assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, scale), f"{tag}: scale was cast"
    if stage == 3:
        world = tdist.get_world_size()
        for layer in layers:
            q = layer.qweight
            assert q.ds_tensor.dtype == torch.uint8, f"{tag}: partition dtype {q.ds_tensor.dtype}"
            expected = -(-q.ds_numel // world)
            assert q.ds_tensor.numel() == expected, f"{tag}: partition {q.ds_tensor.numel()} != {expected}"
            assert q.data.numel() == 0, f"{tag}: qweight resident outside forward"
        say(f"{tag} partition-sizes")

    before = digest(full_qweights(engine.module))
    merges = 0
    for micro in range(3 * GRAD_ACCUM):
        ids = batch(micro)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        now = digest(full_qweights(engine.module))
        if not boundary:
            assert now == before, f"{tag}: backbone changed between micro-batches (micro {micro})"
            continue
        merges += 1
        stats = engine.last_merge_stats.to_dict()
        assert stats and stats["rows_merged"] > 0 and stats["layers"] == len(layers), f"{tag}: {stats}"
        assert now != before, f"{tag}: merge did not change the backbone"
        assert_same_on_all_ranks(now, f"{tag} qweight digest after merge {merges}")
        for layer in layers:
            master = engine._proxy_masters.read_full(layer.B)
            assert not master.any(), f"{tag}: fp32 master of B not zeroed"
            local = layer.B.ds_tensor if hasattr(layer.B, "ds_id") else layer.B
            assert not local.any(), f"{tag}: B not zeroed"
            assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, scales[layers.index(layer)])
        before = now
    assert merges == 3 and engine.global_steps == 3
    say(f"{tag} accumulation-boundaries")
    say(f"{tag} replica-identity")
    say(f"{tag} master-zeroed")
    check_merge_bytes(engine, tag)
    check_merge_bytes(engine, tag, rounding="stochastic", proxy_scale=0.02, step=5)
    check_merge_bytes(engine, tag, unmerged="keep", step=6)
    check_merge_bytes(engine, tag, unmerged="keep", carry=True, proxy_scale=0.02, step=7)
    check_merge_bytes(engine, tag, unmerged="keep", carry=True, proxy_scale=0.02, step=8, topk="all")
    check_merge_bytes(engine, tag, rounding="stochastic", carry=True, proxy_scale=0.02, step=9, topk="all")
    check_nonfinite(engine, tag)


def nan_codes(tensors: list[torch.Tensor]) -> int:
    """E4M3 NaN codes (0x7F / 0xFF) in these uint8 tensors."""
    return sum(int(((t & 0x7F) == 0x7F).sum()) for t in tensors)


def set_master(engine, layer, full: torch.Tensor) -> None:
    """Put ``full`` into B's fp32 master (what an optimizer step that diverged leaves there)."""
    from deepspeed.utils import safe_set_full_fp32_param

    if hasattr(layer.B, "ds_id") or hasattr(layer.B, "_hp_mapping"):
        safe_set_full_fp32_param(layer.B, full)
    else:
        engine._proxy_masters._unfused.get(id(layer.B), layer.B).data.copy_(full)


def check_nonfinite(engine, tag: str) -> None:
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
        engine.step()
    after = full_qweights(engine.module)
    assert nan_codes(after) == 0, f"{tag}: a NaN gradient put NaN codes into the backbone"
    assert_same_on_all_ranks(digest(after), f"{tag} qweight digest after a NaN gradient")
    for layer in layers:
        assert torch.isfinite(engine._proxy_masters.read_full(layer.B)).all(), f"{tag}: NaN gradient reached B's master"
    from falqon_dist.distributed.merge import merge_all

    for topk in (None, "all"):
        for layer in layers:
            layer.topk = topk
            poisoned = torch.zeros(layer.out_features, layer.rank)
            poisoned[3, 1], poisoned[5, 0] = float("nan"), float("inf")
            poisoned[[3, 5], 2:] = 0.5  # large rows: the top-k takes them
            set_master(engine, layer, poisoned)
        before = full_qweights(engine.module)
        stats = merge_all(engine.module, engine._proxy_masters, 3).to_dict()
        after = full_qweights(engine.module)
        assert nan_codes(after) == 0 and stats["nonfinite"] > 0, f"{tag} topk={topk}: {stats}"
        for old, new, layer in zip(before, after, layers):
            assert torch.equal(old[[3, 5]], new[[3, 5]]), f"{tag} topk={topk}: a non-finite row was written"
            master = engine._proxy_masters.read_full(layer.B)
            assert torch.isfinite(master).all() and not master[[3, 5]].any(), f"{tag} topk={topk}: B master"
        assert_same_on_all_ranks(digest(after), f"{tag} qweight digest after a non-finite merge (topk={topk})")
        for layer in layers:
            layer.topk = None
            engine._proxy_masters.zero_(layer.B)
    say(f"{tag} nonfinite-never-reaches-the-backbone")


def check_merge_bytes(
    engine, tag: str, rounding: str = "nearest", proxy_scale: float = 0.5, step: int = 0, unmerged: str = "discard",
    carry: bool = False, topk: str | None = None,
) -> None:
    """The distributed merge writes exactly the bytes a single-process merge writes for the same B
    (with stochastic rounding too: small proxies, so the noise decides many elements); with
    ``unmerged="keep"`` the fp32 master of B then holds exactly the reference's unmerged rows, and
    with ``carry`` (small proxies: much is rounded away) the reference's carried merged rows too.
    With ``topk="all"`` every row is merged; under ZeRO-3 each rank merges its slice without
    gathering W and the carry of rows split between slices is summed over the ranks, so the master
    equals the reference's carry up to float rounding of that sum (and is the same on every rank)."""
    reference = tiny_llama()
    fd.convert_model(reference, RANK_CFG)
    dist_layers = [layer for _, layer in fd.falqon_layers(engine.module)]
    ref_layers = [layer for _, layer in fd.falqon_layers(reference)]
    for ref, full in zip(ref_layers, full_qweights(engine.module)):
        ref.qweight.data.copy_(full)
    for layer in (*dist_layers, *ref_layers):
        layer.merge_rounding, layer.unmerged, layer.carry_residual, layer.topk = rounding, unmerged, carry, topk
    g = torch.Generator().manual_seed(7)  # the same proxies on every rank
    proxies = [torch.randn(layer.out_features, layer.rank, generator=g) * proxy_scale for layer in ref_layers]
    from deepspeed.utils import safe_set_full_fp32_param

    for layer, proxy in zip(dist_layers, proxies):
        if hasattr(layer.B, "ds_id") or hasattr(layer.B, "_hp_mapping"):
            safe_set_full_fp32_param(layer.B, proxy)
        else:
            masters = engine._proxy_masters
            masters._unfused.get(id(layer.B), layer.B).data.copy_(proxy)
    from falqon_dist.distributed.merge import merge_all

    before = [full.clone() for full in full_qweights(engine.module)]
    stats = merge_all(engine.module, engine._proxy_masters, step).to_dict()
    ref_stats = {"rows_merged": 0, "saturated": 0}
    for layer, proxy in zip(ref_layers, proxies):
        s = layer.merge_proxy_(proxy, step=step).to_dict()
        ref_stats = {k: ref_stats[k] + s[k] for k in ref_stats}
        assert topk == "all" or len(select_rows(proxy, layer.rows_per_merge)) == layer.rows_per_merge
    for ref, full in zip(ref_layers, full_qweights(engine.module)):
        assert torch.equal(ref.qweight, full), f"{tag}: distributed {rounding} merge bytes differ from the reference"
    assert stats["rows_merged"] == ref_stats["rows_merged"], (stats, ref_stats)
    assert stats["saturated"] == ref_stats["saturated"], (stats, ref_stats)
    changed = sum(int((a != b).sum()) for a, b in zip(before, full_qweights(engine.module)))
    assert changed > 0, f"{tag}: the {rounding} merge changed nothing"
    for dist_layer, ref in zip(dist_layers, ref_layers):
        master = engine._proxy_masters.read_full(dist_layer.B)
        assert_same_on_all_ranks(digest([master]), f"{tag}: B master after a merge")
        if topk == "all":
            assert torch.allclose(master, ref.B.detach().float(), rtol=1e-5, atol=1e-6), f"{tag}: carry of an all-rows merge"
        else:
            assert torch.equal(master, ref.B.detach().float()), f"{tag}: B master after an unmerged={unmerged} merge"
        if carry:  # every merged row got back what rounding dropped from it
            assert master.ne(0).any(dim=1).all(), f"{tag}: a merged row carried nothing back"
        elif unmerged == "keep":
            assert master.any() and (master.ne(0).any(dim=1).sum() == ref.out_features - ref.rows_per_merge)
        dist_layer.merge_rounding, dist_layer.unmerged, dist_layer.carry_residual = "nearest", "discard", False
        dist_layer.topk = None
        engine._proxy_masters.zero_(dist_layer.B)
    label = ("" if rounding == "nearest" else f"{rounding}-") + ("keep-" if unmerged == "keep" else "")
    label += ("carry-" if carry else "") + ("all-rows-" if topk == "all" else "")
    say(f"{tag} {label}merge-bytes-match-reference")


if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    stage = int(sys.argv[1])
    for bf16 in (False, True):
        check_training(stage, bf16)
    tdist.barrier()
    tdist.destroy_process_group()
