"""The proxy merge: no host synchronization, the ZeRO-3 slice writer equals the whole-tensor writer,
nothing non-finite reaches the FP8 backbone, and the stochastic-rounding noise is a pure function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import falqon_dist as fd
from falqon_dist import fp8
from falqon_dist.fp8.instrument import HostSyncCounter
from falqon_dist.method import every_row
from falqon_dist.method.merge_math import adapter_projector
from falqon_dist.method.proxy import merge_slice_, select_rows
from falqon_dist.method.rounding import Rounding, merge_noise

IN, OUT, RANK = 96, 80, 16


def _model(layers: int, **config) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(IN, IN) for _ in range(layers)])
    fd.convert_model(model, fd.FalqonConfig(rank=RANK, backend="emulated", **config))
    return model


def _train_step(model: nn.Module) -> None:
    x = torch.randn(24, IN, requires_grad=True)
    model(x).pow(2).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-50.0)
                p.grad = None


@pytest.mark.parametrize(
    "recipe, rounding",
    [
        ("every_row", "nearest"),
        ("topk_carry", "nearest"),
        ("topk_keep", "stochastic"),
        ("paper", "stochastic"),
    ],
)
def test_forward_backward_and_merge_issue_no_host_sync(recipe, rounding):
    """0 syncs per layer for fwd+bwd and for the merge of any number of layers; 1 to read the stats."""
    for layers in (1, 6):
        model = _model(layers, merge=recipe, merge_rounding=rounding)
        x = torch.randn(24, IN, requires_grad=True)
        with HostSyncCounter() as fwd_bwd:
            model(x).pow(2).mean().backward()
        assert fwd_bwd.total == 0, fwd_bwd.by_op
        _train_step(model)
        with HostSyncCounter() as merge:
            stats = fd.merge_proxies_(model, step=3)
        assert merge.total == 0, merge.by_op
        with HostSyncCounter() as read:
            counts = stats.to_dict()
        rows = IN if recipe == "every_row" else RANK
        assert (
            read.total == 1
            and counts["layers"] == layers
            and counts["rows_merged"] == layers * rows
        )


def test_sync_counter_sees_what_the_old_merge_did():
    """The counter itself must be able to fail: a boolean mask, .item() and a data-dependent shape."""
    t = torch.arange(10.0)
    with HostSyncCounter() as c:
        t[t > 4].sum().item()
        torch.nonzero(t)
        bool(t.any())
    assert (
        c.by_op["index[bool mask]"] == 1
        and c.by_op["nonzero"] == 1
        and c.by_op["_local_scalar_dense"] >= 2
    )


def _merge_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    bits = fp8.to_bits(
        (torch.randn(OUT + RANK, IN, generator=gen) * 60).clamp(-448, 448).to(fp8.E4M3)
    ).clone()
    proxy = torch.randn(OUT, RANK, generator=gen) * 0.5
    rows = select_rows(proxy, 12)
    adapter_q = fp8.from_bits(bits, fp8.E4M3)[OUT:].float()
    return bits, rows, proxy, adapter_q


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("world", [2, 3, 5, 8])
def test_slice_merge_equals_whole_tensor_merge_for_any_partitioning(world, stochastic):
    bits, rows, proxy, adapter_q = _merge_inputs()
    whole = bits.clone()
    rounding = Rounding(stochastic=stochastic, seed=7, step=11)
    projector = adapter_projector(adapter_q)
    stats, _, carry = merge_slice_(whole, 0, proxy, rows, adapter_q, rounding, projector=projector)
    flat = bits.clone().view(-1)
    old_rows = bits.index_select(0, rows)  # what the ZeRO-3 writer gathers from the slices
    part = -(-flat.numel() // world)  # ZeRO-3-style equal partitions; slices split rows anywhere
    saturated = nonfinite = elements = 0
    for rank in range(world):
        piece = flat[rank * part : (rank + 1) * part].clone()
        s, _, slice_carry = merge_slice_(
            piece,
            rank * part,
            proxy,
            rows,
            adapter_q,
            rounding,
            old_rows=old_rows,
            projector=projector,
        )
        flat[rank * part : rank * part + piece.numel()] = piece
        saturated += int(s.saturated)
        nonfinite += int(s.nonfinite)
        elements += int(s.elements)
        assert int(s.rows_merged) == int(stats.rows_merged)
        assert torch.equal(slice_carry, carry)  # every rank puts the same carry back into B
    assert torch.equal(flat.view_as(whole), whole)
    assert saturated == int(stats.saturated) and nonfinite == int(stats.nonfinite) == 0
    # a top-k merge into a slice needs the rows' bytes
    with pytest.raises(ValueError, match="old_rows"):
        merge_slice_(bits.view(-1)[IN:].clone(), IN, proxy, rows, adapter_q)
    # each merged element owned by one slice
    assert elements == int(stats.elements) == rows.numel() * IN


def test_slice_merge_leaves_a_slice_without_selected_rows_untouched():
    bits, rows, proxy, adapter_q = _merge_inputs()
    last = int(rows.max())
    start = (last + 1) * IN  # a slice that starts after the last selected row
    piece = bits.view(-1)[start : start + 3 * IN].clone()
    before = piece.clone()
    stats = merge_slice_(
        piece, start, proxy, rows, adapter_q, old_rows=bits.index_select(0, rows)
    ).stats
    assert torch.equal(piece, before) and int(stats.saturated) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_update_never_reaches_the_backbone(bad):
    model = _model(1)
    layer = model[0]
    before = layer.qweight.clone()
    with torch.no_grad():
        layer.B.normal_(std=0.01)
        layer.B[3, 0] = bad  # row 3 (and only row 3) has a non-finite update
    stats = fd.merge_proxies_(model).to_dict()
    codes = layer.qweight.view(-1)
    assert not ((codes & 0x7F) == 0x7F).any(), "NaN codes (0x7F/0xFF) written into qweight"
    adapter_nonzero = int((layer.adapter_q()[0] != 0).sum())
    assert stats["nonfinite"] == adapter_nonzero  # every element of row 3 that A touches
    changed = (layer.qweight != before).any(dim=1)
    assert not changed[3] and changed[:IN].sum() > 0  # the bad row kept, the others merged


@pytest.mark.parametrize("merge", ["topk_keep", "topk_carry"])
def test_non_finite_rows_of_b_are_zeroed_merged_or_not(merge):
    """NaN rows beyond the k a merge takes (and the taken ones) leave B zeroed: the next forward is finite."""
    model = _model(1, merge=merge, topk=2)
    layer = model[0]
    with torch.no_grad():
        layer.B.normal_(std=0.01)
        layer.B[[3, 5, 7], 1] = float("nan")  # three bad rows, two merged per step
    stats = fd.merge_proxies_(model).to_dict()
    assert stats["nonfinite"] > 0
    assert torch.isfinite(layer.B).all() and not layer.B[[3, 5, 7]].any()
    assert layer.B.any()  # the good unmerged rows are kept
    assert torch.isfinite(model(torch.randn(4, IN))).all()


def test_non_finite_rows_of_b_leave_the_backbone_and_the_carry_finite_when_every_row_is_merged():
    model = _model(1)  # every_row, the default
    layer = model[0]
    before = layer.qweight.clone()
    with torch.no_grad():
        layer.B.normal_(std=0.01)
        layer.B[[3, 5], 1] = float("nan")
        layer.B[7, 0] = float("inf")
    stats = fd.merge_proxies_(model).to_dict()
    assert stats["nonfinite"] == 3 * IN and stats["changed"] > 0
    assert torch.equal(layer.qweight[[3, 5, 7]], before[[3, 5, 7]])  # the bad rows keep their bytes
    assert torch.isfinite(layer.B).all() and not layer.B[[3, 5, 7]].any()
    assert torch.isfinite(model(torch.randn(4, IN))).all()


def test_merge_noise_is_uniform_and_a_pure_function_of_seed_step_and_element():
    index = torch.arange(200_000)
    noise = merge_noise(5, 9, index)
    assert noise.dtype == torch.float32 and noise.min() >= 0 and noise.max() < 1
    assert abs(float(noise.mean()) - 0.5) < 0.005 and abs(float(noise.var()) - 1 / 12) < 0.002
    histogram = torch.histc(noise, bins=10, min=0, max=1) / noise.numel()
    assert (histogram - 0.1).abs().max() < 0.005
    # any subset: same values
    assert torch.equal(merge_noise(5, 9, index[1000:2000]), noise[1000:2000])
    assert not torch.equal(merge_noise(5, 10, index), noise) and not torch.equal(
        merge_noise(6, 9, index), noise
    )
    # neighbouring elements and steps are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([noise[:-1], noise[1:]]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([noise, merge_noise(5, 10, index)]))[0, 1])) < 0.01
    # large element indices (layers beyond 2^32 elements) are mixed too
    big = merge_noise(5, 9, index + (1 << 32))
    assert not torch.equal(big, noise)


@pytest.mark.parametrize("merge", ["paper", "every_row"])
def test_changed_counts_the_bytes_a_merge_really_wrote(merge):
    """An update far below half an FP8 step is rounded away (changed = 0: the trainer warns about the
    learning rate); a large one changes the bytes of the merged rows."""
    model = _model(1, merge=merge)
    layer = model[0]
    with torch.no_grad():
        layer.B.fill_(1e-9)
    tiny = fd.merge_proxies_(model).to_dict()
    assert tiny["rows_merged"] == (IN if merge == "every_row" else RANK) and tiny["changed"] == 0
    before = layer.qweight.clone()
    with torch.no_grad():
        layer.B.normal_(std=0.1)
    large = fd.merge_proxies_(model).to_dict()
    assert large["changed"] == int((layer.qweight != before).sum()) > 0


@pytest.mark.parametrize("tile_bytes", [None, 16 * IN * 4], ids=["one-tile", "16-row-tiles"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("world", [1, 2, 3, 5, 8, 200])
def test_all_rows_slice_merge_equals_the_whole_merge_for_any_partitioning(
    world, stochastic, tile_bytes, monkeypatch
):
    """Every row merged into slices (ZeRO-3, merge="every_row"): the same bytes as the whole-tensor merge,
    A's rows untouched, each element counted by one slice, and the slices' partial carries summing
    to the whole merge's carry (float rounding of the sum aside); with several tiles, a slice
    computes only the tiles it touches."""
    if tile_bytes:
        monkeypatch.setattr(every_row, "TILE_BYTES", tile_bytes)
    bits, _, _, adapter_q = _merge_inputs()
    proxy = torch.randn(OUT, RANK, generator=torch.Generator().manual_seed(3)) * 0.05
    rounding = Rounding(stochastic=stochastic, seed=7, step=11)
    projector = adapter_projector(adapter_q)
    whole = bits.clone()
    stats, _, carry = merge_slice_(whole, 0, proxy, None, adapter_q, rounding, projector=projector)
    flat = bits.clone().view(-1)
    part = -(-flat.numel() // world)
    carry_sum = torch.zeros_like(carry)
    saturated = changed = elements = 0
    for rank in range(world):
        piece = flat[rank * part : (rank + 1) * part].clone()
        s, _, partial = merge_slice_(
            piece, rank * part, proxy, None, adapter_q, rounding, projector=projector
        )
        flat[rank * part : rank * part + piece.numel()] = piece
        carry_sum += partial
        saturated, changed, elements = (
            saturated + int(s.saturated),
            changed + int(s.changed),
            elements + int(s.elements),
        )
        assert int(s.rows_merged) == int(stats.rows_merged) == OUT
    assert torch.equal(flat.view_as(whole), whole) and torch.equal(whole[OUT:], bits[OUT:])
    assert (saturated, changed, elements) == (int(stats.saturated), int(stats.changed), OUT * IN)
    assert int(stats.changed) > 0
    assert torch.allclose(carry_sum, carry, rtol=1e-5, atol=1e-6) and carry.any()


@pytest.mark.parametrize("owned", [False, True], ids=["all", "owned"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_the_compiled_merge_kernel_gives_the_eager_bits_and_counts(stochastic, owned):
    """The fused merge (fp8.cast=compiled, the default) against its eager reference, on blocks of
    several shapes with saturating, non-finite and rounded-away updates in them."""
    from falqon_dist.fp8 import cast as fp8_cast
    from falqon_dist.method import merge_math as proxy_module

    assert fp8_cast.cast_kernels() == "compiled"
    gen = torch.Generator().manual_seed(11)
    for rows, cols in ((80, 96), (16, 96), (3, 40)):
        old = fp8.to_bits(
            (torch.randn(rows, cols, generator=gen) * 120).clamp(-448, 448).to(fp8.E4M3)
        ).clone()
        update = (
            torch.randn(rows, cols, generator=gen)
            * torch.tensor([0.01, 1.0, 300.0])[torch.randint(0, 3, (rows, cols), generator=gen)]
        )
        update[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        noise = (
            merge_noise(3, 4, torch.arange(rows * cols).view(rows, cols)) if stochastic else None
        )
        mask = torch.rand(rows, cols, generator=gen) < 0.6 if owned else None
        compiled = proxy_module.merged_row_bits(old, update, noise, mask)
        eager = proxy_module._merge_rows(old, update, noise, mask)
        for name, a, b in zip(proxy_module.MergedRows._fields, compiled, eager):
            assert torch.equal(a, b), (name, rows, cols)
        assert int(compiled.saturated) > 0 and int(compiled.nonfinite) == (
            int(mask[0, :3].sum()) if owned else 3
        )


@pytest.mark.parametrize("carry", [False, True], ids=["no-carry", "carry"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize(
    "shape", [(80, 96, 8 * 96 * 4 * 2), (1000, 1100, None)], ids=["16-row-tiles", "2-tiles"]
)
def test_the_tiled_every_row_merge_gives_the_untiled_bytes_carry_and_counts(
    stochastic, carry, shape, monkeypatch
):
    """The every-row merge in tiles against the untiled formula as first written (the update and
    the residual as whole out × in tensors), with saturating, non-finite and empty rows of B: the
    same bytes, written in place, the same carry and counts."""
    from falqon_dist.method import merge_math

    out, in_features, tile_bytes = shape
    if tile_bytes:
        monkeypatch.setattr(every_row, "TILE_BYTES", tile_bytes)
    assert every_row.tile_rows(out, in_features) < out  # several tiles
    gen = torch.Generator().manual_seed(5)
    bits = fp8.to_bits(
        (torch.randn(out + RANK, in_features, generator=gen) * 60).clamp(-448, 448).to(fp8.E4M3)
    )
    adapter_q = fp8.from_bits(bits, fp8.E4M3)[out:].float()
    proxy = torch.randn(out, RANK, generator=gen) * 0.05
    proxy[2] *= 1e4  # saturates
    proxy[5, 0] = float("nan")  # a non-finite row: its elements keep their bytes
    proxy[7] = 0  # a row with nothing to merge
    projector = adapter_projector(adapter_q) if carry else None
    rounding = Rounding(stochastic=stochastic, seed=2, step=9)
    tiled = bits.clone()
    merge = merge_slice_(tiled, 0, proxy, None, adapter_q, rounding, projector=projector)
    noise = (
        rounding.noise(torch.arange(out * in_features).view(out, in_features))
        if stochastic
        else None
    )
    untiled = merge_math._merge_rows(bits[:out], proxy @ adapter_q, noise, None)
    assert torch.equal(tiled[:out], untiled[0]) and torch.equal(tiled[out:], bits[out:])
    assert merge.bits.data_ptr() == tiled.data_ptr() and merge.bits.shape == (
        out,
        in_features,
    )  # in place
    counts = [
        merge.stats.saturated,
        merge.stats.nonfinite,
        merge.stats.changed,
        merge.stats.elements,
    ]
    assert [int(c) for c in counts] == [int(c) for c in untiled[2:]]
    # the NaN and zero rows
    assert int(merge.stats.rows_merged) == out - 2 and int(merge.stats.saturated) > 0
    assert int(merge.stats.nonfinite) == in_features and torch.equal(tiled[5], bits[5])
    if carry:
        reference = merge_math.project_onto_adapter(untiled[1], projector)
        assert torch.equal(merge.carry, reference) and merge.carry.any()
    else:
        assert merge.carry is None


def test_the_update_is_an_fp32_multiply_add_chain_over_the_rank():
    """What makes the bytes independent of the tiling: the CPU GEMM computes each element of a
    tile's update ``B_t·A_q`` as ``fma(B_j,r−1, A_r−1, … fma(B_j0, A_0, 0))`` (emulated exactly
    in float64: the product of an fp32 and an FP8 value is exact there), for the tile shapes the
    merge uses. A BLAS that summed in another order would fail here, not silently change bytes."""
    gen = torch.Generator().manual_seed(1)
    for out, in_features in ((1000, 1100), (80, 96), (4104, 512)):
        tile = every_row.tile_rows(out, in_features)
        proxy = torch.randn(tile, RANK, generator=gen) * 0.03
        adapter_q = (
            (torch.randn(RANK, in_features, generator=gen) * 60)
            .clamp(-448, 448)
            .to(fp8.E4M3)
            .float()
        )
        chain = torch.zeros(tile, in_features)
        for k in range(RANK):
            chain = (
                chain.double() + proxy[:, k : k + 1].double() * adapter_q[k : k + 1].double()
            ).float()
        assert torch.equal(proxy @ adapter_q, chain), (out, in_features)


def test_tile_rows_fit_the_budget_and_are_balanced():
    assert every_row.tile_rows(80, 96) == 80  # the whole update fits: one tile
    for out, in_features in ((11008, 4096), (4096, 11008), (4097, 4096), (50_000, 200_000)):
        tile = every_row.tile_rows(out, in_features)
        assert tile % 8 == 0 and (tile * in_features * 4 <= every_row.TILE_BYTES or tile == 8)
        last = out - (-(-out // tile) - 1) * tile
        assert last > tile // 2 or tile == 8, (out, in_features, tile, last)  # no sliver at the end


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_merging_a_7b_mlp_layer_never_builds_a_temporary_over_16_mib(rounding):
    """A 4096 → 11008 layer (rank 64, the default every-row merge with carry): the fp32 update alone
    would be 180 MB as one tensor; in tiles no op creates more than 16 MiB."""
    from falqon_dist.fp8.instrument import OpTraffic

    layer = fd.FalqonLinear(4096, 11008, config=fd.FalqonConfig(rank=64, backend="emulated"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.qweight.copy_(
            fp8.to_bits(
                (torch.randn(layer.qweight.shape, generator=gen) * 40).clamp(-448, 448).to(fp8.E4M3)
            )
        )
        layer.B.normal_(std=1e-2, generator=gen)
    before = layer.qweight[:11008].clone()
    adapter_q, rounding_of = layer.adapter_q(), Rounding(stochastic=True, seed=0, step=1)
    with OpTraffic() as traffic:
        if rounding == "nearest":  # the layer's merge: every row, with the carry
            stats = layer.merge_proxy_(step=1).to_dict()
        else:  # the same tiles with stochastic noise (the primitive: no recipe rounds every row stochastically)
            stats = merge_slice_(
                layer.qweight.data, 0, layer.B.detach().float(), None, adapter_q, rounding_of
            ).stats.to_dict()
    assert traffic.largest_output <= 16 * 2**20, (traffic.largest_output, traffic.largest_op)
    assert (
        stats["elements"] == 11008 * 4096
        and stats["changed"] == int((layer.qweight[:11008] != before).sum()) > 0
    )


def test_merge_every_n_steps_merges_on_every_nth_step_and_keeps_b_live_in_between():
    """method.merge_every=2: after step 1 nothing is written and B keeps its update (the layer then
    adds its LoRA term forward and backward, as LoRA); after step 2 B is merged as usual."""
    with pytest.raises(ValueError, match="merge_every"):
        fd.FalqonConfig(merge_every=0)
    model = _model(1, merge_every=2)
    layer = model[0]
    assert layer.lora_terms == (True, True) and "merge_every=2" in repr(layer)
    before = layer.qweight.clone()
    with torch.no_grad():
        layer.B.normal_(std=0.05)
    update = layer.B.detach().clone()
    skipped = fd.merge_proxies_(model, step=1)
    assert (
        skipped.layers == 0 and torch.equal(layer.qweight, before) and torch.equal(layer.B, update)
    )
    x = torch.randn(8, IN)
    x_q, s_x = fp8.quantize_dynamic(x)
    reference = (
        fp8.dequantize(x_q, s_x) @ (layer.backbone_weight() + update @ layer.adapter_weight()).t()
    )
    # B's updates are live in the forward
    assert fp8.sqnr_db(reference + layer.bias, model(x).detach()) > 40
    merged = fd.merge_proxies_(model, step=2).to_dict()
    assert (
        merged["layers"] == 1 and merged["changed"] > 0 and not torch.equal(layer.qweight, before)
    )
    assert layer.B.abs().max() < update.abs().max()  # B now holds only the carry


#: Every merge recipe × rounding a config can hold (stochastic with a carry is refused).
RECIPES = {
    "every_row": dict(merge="every_row"),
    "topk_carry": dict(merge="topk_carry"),
    "topk_keep nearest": dict(merge="topk_keep"),
    "topk_keep stochastic": dict(merge="topk_keep", merge_rounding="stochastic"),
    "paper nearest": dict(merge="paper"),
    "paper stochastic": dict(merge="paper", merge_rounding="stochastic"),
}


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_merges_without_updates_leave_the_backbone_fixed(recipe):
    """After one real update, merges that receive no further update (the optimizer adds nothing to
    B) must not move the layer: without a carry B is zero and not one byte changes; with the carry
    (nearest rounding) the bytes settle to a fixed point and the effective weight W + C·A stays within
    3% of its norm (the carry's out-of-span part is dropped while it settles; 0 bytes change by merge
    1,000; with stochastic rounding the carry fed the
    noise back: 7–11k of 131k bytes changed at every merge, 29% drift — hence refused)."""
    torch.manual_seed(0)
    layer = fd.FalqonLinear.from_linear(
        nn.Linear(256, 512), fd.FalqonConfig(rank=16, backend="emulated", **recipe)
    )

    def effective() -> torch.Tensor:
        return layer.backbone_weight() + layer.B.detach().float() @ layer.adapter_weight()

    with torch.no_grad():
        layer.B.copy_(torch.randn_like(layer.B) * 0.05)
    # every row once: B then holds only a carry, if any
    layer.merge_proxy_(step=1, rows=torch.arange(512))
    first, start = effective(), layer.qweight.clone()
    changed = []
    for step in range(2, 102 if layer.carry_residual else 12):
        before = layer.qweight.clone()
        layer.merge_proxy_(step=step)
        changed.append(int((before != layer.qweight).sum()))
    drift = float((effective() - first).norm() / first.norm())
    if layer.carry_residual:
        # settling: the last ten merges change under half the bytes of the first ten (measured: every
        # row 3% of them, drift 1.2%; top-k keep 42%, drift 0.5%; every row: 0 bytes change by merge 1,000)
        settled = sum(changed[-10:]) / sum(changed[:10])
        assert settled < 0.5 and drift < 0.03, (changed[:3], changed[-3:], settled, drift)
    else:
        assert sum(changed) == 0 and torch.equal(start, layer.qweight) and drift == 0.0
