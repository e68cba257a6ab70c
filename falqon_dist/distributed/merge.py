"""Proxy merges on every rank, consistently, under ZeRO stages 0–3.

Stages 0–2 keep a full ``qweight`` replica on every rank: each rank reads the same fp32 master B,
makes the same top-k choice and writes the same bytes (``FalqonLinear.merge_proxy_``).

Stage 3 partitions ``qweight``: rank p owns the flat elements ``[p·n, (p+1)·n)`` of the row-major
``M_q``. A merge gathers only what it needs — the full B (out × r, fp32, via the master), the k selected
rows and the adapter rows ``A_q`` ((k + r) × in bytes, one all-reduce of the pieces each rank owns)
— computes the merged rows exactly as the unsharded merge does, and writes only the local slice
with the method's own ``apply_rows_to_slice_``. Traffic per layer: O(r·out + (k + r)·in), never the
O(in·out) backbone. A parameter ZeRO-3 keeps resident (``ds_persist``, below the persistence
threshold) is also updated in its full resident copy.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn

from falqon_dist.fp8 import E4M3
from falqon_dist.method import falqon_layers
from falqon_dist.method.proxy import MergeStats, RowMerge, apply_rows_to_slice_, select_rows
from falqon_dist.distributed.proxies import ProxyMasters
from falqon_dist.distributed.zero_facts import is_partitioned


def _gather_rows(qweight: nn.Parameter, rows: torch.Tensor, in_features: int) -> torch.Tensor:
    """Rows ``rows`` of the ZeRO-3 partitioned ``M_q`` as uint8 (len(rows) × in), on every rank.

    Sync-free and one all-reduce: each rank contributes the bytes it owns (zeros elsewhere), and
    every byte has exactly one owner, so the sum is that byte.
    """
    part, numel = qweight.ds_tensor.view(-1), qweight.ds_tensor.ds_numel
    group = qweight.ds_process_group
    start = numel * tdist.get_rank(group=group)
    local = rows.to(part.device).unsqueeze(1) * in_features + torch.arange(in_features, device=part.device) - start
    owned = (local >= 0) & (local < numel)
    if numel:
        pieces = torch.where(owned, part[local.clamp(0, numel - 1)].to(torch.int32), 0)
    else:
        pieces = torch.zeros_like(local, dtype=torch.int32)
    tdist.all_reduce(pieces, group=group)
    return pieces.to(torch.uint8)


def _merge_partitioned(layer, proxy: torch.Tensor, rows: torch.Tensor, step: int) -> RowMerge:
    qweight, out, r = layer.qweight, layer.out_features, layer.rank
    proxy_rows = proxy.index_select(0, rows)
    adapter_rows = torch.arange(out, out + r, device=rows.device, dtype=rows.dtype)
    gathered = _gather_rows(qweight, torch.cat([rows, adapter_rows]), layer.in_features)
    old_rows, adapter_q = gathered[: rows.numel()], gathered[rows.numel() :].view(E4M3).float()
    rounding = layer.rounding(step)
    part = qweight.ds_tensor.view(-1)
    offset = qweight.ds_tensor.ds_numel * tdist.get_rank(group=qweight.ds_process_group)
    merge = apply_rows_to_slice_(part, offset, rows, old_rows, proxy_rows, adapter_q, rounding, carry=layer.carry_residual)
    if qweight.data.numel():  # resident full copy (ds_persist): same update, same bytes
        resident = qweight.data.view(out + r, layer.in_features)
        resident.index_copy_(0, rows.to(resident.device), merge.bits.to(resident.device))
        layer.rows_rewritten(rows, merge.bits)
    return merge


@torch.no_grad()
def merge_all(model: nn.Module, masters: ProxyMasters, step: int = 0) -> MergeStats:
    """Merge every FALQON layer of a DeepSpeed-wrapped model; same result on every rank.

    ``step`` (the engine's global step) keys stochastic merge rounding. No host synchronization of
    our own (DeepSpeed's master-copy accessors may add theirs): the totals are device tensors, the
    element counts summed over the ranks' partitions under ZeRO-3 in one all-reduce.
    """
    totals, partitioned, group = MergeStats(), MergeStats(), None
    for _, layer in falqon_layers(model):
        proxy = masters.read_full(layer.B)
        rows = select_rows(proxy, layer.rows_per_merge)
        if is_partitioned(layer.qweight):
            merge = _merge_partitioned(layer, proxy, rows, step)
            partitioned.add_(merge.stats)
            group = layer.qweight.ds_process_group
        else:
            merge = layer.merge_rows_(proxy, rows, step=step)
            totals.add_(merge.stats)
        masters.write_(layer.B, layer.remainder(proxy, rows, merge.carry))  # zeros, B's unmerged rows, or + the carry
    if group is not None and partitioned.layers:  # each rank counted its own slice's elements; rows once
        counts = partitioned.counts()
        tdist.all_reduce(counts[1:], group=group)
        totals.add_(MergeStats(*counts, layers=partitioned.layers))
    return totals
