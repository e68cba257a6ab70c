"""The model-level proxy merge (:func:`merge_model_`): on every rank, consistently, under ZeRO stages 0–3.

One function merges a whole model for every caller: FALQON's post-optimizer hook
(:mod:`falqon_dist.distributed.merge_hook`: the trainer, ``FalqonCallback`` in a Hugging Face
``Trainer``), the final fold before an export, and the exporter's fold of what B still holds
(:func:`falqon_dist.export.exporter.merge_pending_proxies_`). :func:`falqon_dist.merge_proxies_` is
its single-process form for a model outside any optimizer wrapper (the method package, which never
imports this one, keeps it: the same bytes, the same B).

Stages 0–2 keep a full ``qweight`` replica on every rank: each rank reads the same fp32 master B,
makes the same top-k choice and writes the same bytes (``FalqonLinear.merge_rows_``).

Stage 3 partitions ``qweight``: rank p owns the flat elements ``[p·n, (p+1)·n)`` of the row-major
``M_q``. A merge gathers only what it needs — the full B (out × r, fp32, via the master), the k
selected rows (k × in bytes, one all-reduce of the pieces each rank owns) and, at the first merge
only, the adapter rows ``A_q`` (r × in bytes, then kept by the layer: A is frozen) — computes the
merged rows exactly as the unsharded merge does, and writes only the local slice with the method's
own merge primitive, ``merge_slice_``. Traffic per layer: O(r·out + k·in), never the O(in·out)
backbone. With the every-row merge (``merge="every_row"``) no W row is gathered at all: each
element's update needs only its own byte, B and A_q, each rank computes only the tiles of its own
slice (its cost shrinks as ranks are added), and the rows a slice boundary splits get their carry
from one all-reduce of the slices' partial projections (out × r). A parameter ZeRO-3 keeps resident
(``ds_persist``, below the persistence threshold) is merged as a replica, and its slice copied into
the partition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as tdist
from torch import nn

from falqon_dist.distributed.proxies import ProxyMasters
from falqon_dist.distributed.zero_facts import is_partitioned
from falqon_dist.method import FalqonLinear, falqon_layers
from falqon_dist.method.merge_math import MergeStats, RowMerge
from falqon_dist.method.proxy import merge_slice_


def _gather_rows(qweight: nn.Parameter, rows: torch.Tensor, in_features: int) -> torch.Tensor:
    """Rows ``rows`` of the ZeRO-3 partitioned ``M_q`` as uint8 (len(rows) × in), on every rank.

    Sync-free and one all-reduce: each rank contributes the bytes it owns (zeros elsewhere), and
    every byte has exactly one owner, so the sum is that byte.
    """
    part, numel = qweight.ds_tensor.view(-1), qweight.ds_tensor.ds_numel
    group = qweight.ds_process_group
    start = numel * tdist.get_rank(group=group)
    local = (
        rows.to(part.device).unsqueeze(1) * in_features
        + torch.arange(in_features, device=part.device)
        - start
    )
    owned = (local >= 0) & (local < numel)
    if numel:
        pieces = torch.where(owned, part[local.clamp(0, numel - 1)].to(torch.int32), 0)
    else:
        pieces = torch.zeros_like(local, dtype=torch.int32)
    tdist.all_reduce(pieces, group=group)
    return pieces.to(torch.uint8)


def _merge_partitioned(
    layer, proxy: torch.Tensor, rows: torch.Tensor | None, step: int, fold: bool
) -> RowMerge:
    """Merge into this rank's slice of a partitioned ``M_q``: the stats count only the slice.
    ``fold``: the final fold (``FalqonLinear.fold_``: nearest, no carry)."""
    qweight, out, r = layer.qweight, layer.out_features, layer.rank
    group = qweight.ds_process_group
    adapter_rows = torch.arange(out, out + r, device=proxy.device)
    # A is frozen: its bytes are gathered at the first merge only, then kept by the layer
    adapter_q = layer.adapter_q(
        gather=lambda: _gather_rows(qweight, adapter_rows, layer.in_features)
    )
    projector = layer.adapter_projector(adapter_q) if layer.carry_residual and not fold else None
    part = qweight.ds_tensor.view(-1)
    offset = qweight.ds_tensor.ds_numel * tdist.get_rank(group=group)
    old_rows = None if rows is None else _gather_rows(qweight, rows, layer.in_features)
    merge = merge_slice_(
        part,
        offset,
        proxy,
        rows,
        adapter_q,
        layer.merge_rounding_at(step, fold),
        old_rows=old_rows,
        projector=projector,
    )
    if rows is None and merge.carry is not None:  # every row: the carry is this slice's partial sum
        tdist.all_reduce(merge.carry, group=group)
    return merge


def _merge_resident(
    layer, proxy: torch.Tensor, rows: torch.Tensor | None, step: int, fold: bool
) -> RowMerge:
    """A ZeRO-3 parameter kept whole on every rank (``ds_persist``): merge the replica as ZeRO 0–2
    do, then copy this rank's slice of it into the partition."""
    merge = layer.merge_rows_(proxy, rows, step=step, fold=fold)
    qweight = layer.qweight
    part, numel = qweight.ds_tensor.view(-1), qweight.ds_tensor.ds_numel
    start = numel * tdist.get_rank(group=qweight.ds_process_group)
    owned = qweight.data.reshape(-1)[start : start + numel]
    part[: owned.numel()].copy_(owned)
    return merge


@torch.no_grad()
def merge_model_(
    model: nn.Module,
    masters: ProxyMasters | None = None,
    *,
    step: int = 0,
    fold: bool = False,
    layers: Sequence[tuple[str, FalqonLinear]] | None = None,
) -> MergeStats:
    """Merge B into the FP8 backbone in every FALQON layer of ``model``: the one model-level merge,
    the same result on every rank under ZeRO 0–3 (a whole model in one process too).

    ``masters`` says where each B's full-precision master lives (:class:`ProxyMasters`; default: the
    parameters themselves) and is read, then set to what B keeps (zeros, the rows a merge did not
    take, or the carry). ``step`` (the optimizer's, 1, 2, …) keys stochastic merge rounding and, with
    ``merge_every > 1``, picks the steps that merge (``layers`` of the result counts the layers
    merged). ``fold=True`` is the final fold instead (``FalqonLinear.fold_``: every layer, every row,
    nearest, nothing carried, B and its master zeroed): afterwards the model computes exactly what
    its FP8 export holds. The fold reads B in the model's dtype (the master rounded as the parameter
    is), which is what a checkpoint's module state holds, so an export of the checkpoint saved just
    before the fold (``launch/export.py``) folds the same values into the same bytes. ``layers``
    restricts the merge to these ``(name, layer)`` pairs of ``model`` (default: all of them).

    No host synchronization of our own (DeepSpeed's master-copy accessors may add theirs): the
    totals are device tensors, the element counts summed over the ranks' partitions under ZeRO-3 in
    one all-reduce.
    """
    masters = ProxyMasters() if masters is None else masters
    totals, partitioned, group = MergeStats(), MergeStats(), None
    for _, layer in falqon_layers(model) if layers is None else layers:
        # method.merge_every: B keeps accumulating until its step
        if not (fold or layer.merge_due(step)):
            continue
        proxy = masters.read_full(layer.B)
        # B as the model (and so its checkpoint's module state) holds it: an export folds that
        if fold:
            proxy = proxy.to(layer.B.dtype).float()
        rows = None if fold else layer.rows_to_merge(proxy)
        if is_partitioned(layer.qweight) and not layer.qweight.data.numel():
            merge = _merge_partitioned(layer, proxy, rows, step, fold)
            partitioned.add_(merge.stats)
            group = layer.qweight.ds_process_group
        else:  # a replica: every rank merges the same whole M_q (and counts it whole)
            merge = (
                _merge_resident(layer, proxy, rows, step, fold)
                if is_partitioned(layer.qweight)
                else (layer.merge_rows_(proxy, rows, step=step, fold=fold))
            )
            totals.add_(merge.stats)
        if fold:
            masters.zero_(layer.B)
        else:  # zeros, B's unmerged rows, or + the carry
            masters.write_(layer.B, layer.remainder(proxy, rows, merge.carry))
    # each rank counted its own slice's elements; rows once
    if group is not None and partitioned.layers:
        counts = partitioned.counts()
        tdist.all_reduce(counts[1:], group=group)
        totals.add_(MergeStats.from_counts(counts, partitioned.layers))
    return totals
