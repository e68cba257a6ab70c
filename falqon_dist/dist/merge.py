"""Proxy merges on every rank, consistently, under ZeRO stages 0–3.

Stages 0–2 keep a full ``qweight`` replica on every rank: each rank reads the same fp32 master B,
makes the same top-k choice and writes the same bytes (``FalqonLinear.merge_proxy_``).

Stage 3 partitions ``qweight``: rank p owns the flat elements ``[p·n, (p+1)·n)`` of the row-major
``M_q``. A merge gathers only what it needs — the full B (out × r, fp32, via the master) and the
adapter rows ``A_q`` (r × in bytes, one all-reduce of the pieces each rank owns) — and then updates
only the local slice with the method's own ``apply_rows_to_slice_``. Traffic per layer: O(r·(in + out)), never
the O(in·out) backbone. A parameter ZeRO-3 keeps resident (``ds_persist``, below the persistence
threshold) is also updated in its full resident copy.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn

from falqon_dist.fp8 import E4M3
from falqon_dist.method import falqon_layers
from falqon_dist.method.proxy import MergeStats, apply_rows_, apply_rows_to_slice_, select_rows
from falqon_dist.dist.proxies import ProxyMasters


def _gather_adapter_rows(qweight: nn.Parameter, out_features: int, in_features: int, rank: int) -> torch.Tensor:
    """``M_q[out:]`` as float32 (rank × in) from the ZeRO-3 partitions (one small all-reduce)."""
    group = qweight.ds_process_group
    part, numel = qweight.ds_tensor.view(-1), qweight.ds_tensor.ds_numel
    start = numel * tdist.get_rank(group=group)
    lo_a, hi_a = out_features * in_features, (out_features + rank) * in_features
    lo, hi = max(start, lo_a), min(start + numel, hi_a)
    pieces = torch.zeros(hi_a - lo_a, dtype=torch.int32, device=part.device)
    if lo < hi:
        pieces[lo - lo_a : hi - lo_a] = part[lo - start : hi - start].to(torch.int32)
    tdist.all_reduce(pieces, group=group)  # each byte has exactly one owner: the sum is that byte
    return pieces.to(torch.uint8).view(E4M3).float().view(rank, in_features)


def _merge_partitioned(layer, proxy: torch.Tensor, rows: torch.Tensor, step: int) -> MergeStats:
    qweight = layer.qweight
    proxy_rows = proxy.index_select(0, rows)
    adapter_q = _gather_adapter_rows(qweight, layer.out_features, layer.in_features, layer.rank)
    rounding = layer.rounding(step)
    part = qweight.ds_tensor.view(-1)
    offset = qweight.ds_tensor.ds_numel * tdist.get_rank(group=qweight.ds_process_group)
    stats = apply_rows_to_slice_(part, offset, layer.in_features, rows, proxy_rows, adapter_q, rounding)
    if qweight.data.numel():  # resident full copy (ds_persist): same update, same bytes
        resident = qweight.data.view(layer.out_features + layer.rank, layer.in_features)
        _, new_bits = apply_rows_(resident, rows, proxy_rows, adapter_q, rounding)
        layer.rows_rewritten(rows, new_bits)
    return stats


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
        if hasattr(layer.qweight, "ds_id"):
            partitioned.add_(_merge_partitioned(layer, proxy, rows, step))
            group = layer.qweight.ds_process_group
        else:
            totals.add_(layer.merge_proxy_(proxy, step=step, rows=rows))
        masters.write_(layer.B, layer.remainder(proxy, rows))  # zeros, or B's unmerged rows (keep)
    if group is not None and partitioned.layers:  # each rank counted its own slice's elements; rows once
        counts = partitioned.counts()
        tdist.all_reduce(counts[1:], group=group)
        totals.add_(MergeStats(*counts, layers=partitioned.layers))
    return totals
