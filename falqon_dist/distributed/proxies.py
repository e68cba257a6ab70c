"""Reading and writing B where the optimizer keeps it: the full-precision master copy.

With bf16 on, DeepSpeed's optimizer holds an fp32 master of every trainable parameter and copies it
back into the bf16 parameter after each step; zeroing only the bf16 B would be undone by the next
step. Each optimizer keeps its master elsewhere:

==========================  =============================  ======================================
optimizer                   where the master lives          read / write
==========================  =============================  ======================================
ZeRO-3                      fp32 partition per rank         ``safe_get_full_fp32_param`` (gathers)
                                                            / ``safe_set_local_fp32_param``
ZeRO-1/2, BF16_Optimizer    fp32 fragment (``_hp_mapping``) ``safe_get_full_fp32_param`` /
                                                            ``safe_set_full_fp32_param``
stage 0 + bf16              FP16_(Unfused)Optimizer's       its ``fp32_groups`` (unfused) or a
                            fp32 groups                     slice of ``fp32_groups_flat`` (fused)
stage 0 fp32, a plain       the parameter itself            ``param.data``; a ZeRO-3 partitioned
torch optimizer, or none                                    one: gathered / its ``ds_tensor``
==========================  =============================  ======================================

The merge writes B's new value (``write_``: zeros for the paper's merge, B with only its merged rows
zeroed where the recipe keeps the others, or the carry) into the master, the low-precision parameter
and its ZeRO-3 partition, each ZeRO-3 rank its own partition; ``zero_`` is the all-zeros case. Adam's
moments are left as they are, as in the authors' code: the method resets B, not the optimizer.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

from falqon_dist.distributed.zero_facts import full_shape, is_partitioned


def _is_deepspeed(optimizer: object) -> bool:
    """Whether ``optimizer`` is one of DeepSpeed's (ZeRO, BF16, FP16 wrappers, its fused Adam)."""
    return type(optimizer).__module__.split(".")[0] == "deepspeed"


class ProxyMasters:
    """Locates the full-precision master of each B for one optimizer.

    ``optimizer``: DeepSpeed's (``engine.optimizer``), whose masters are read and written through
    DeepSpeed's accessors; a plain torch optimizer or None: every parameter is its own master (a
    ZeRO-3 partitioned one is gathered to be read and written partition by partition, so a model
    wrapped by an engine can be merged without touching the optimizer's state: the exporter's case).
    """

    def __init__(self, optimizer: object | None = None) -> None:
        #: Whether the optimizer keeps masters apart from the parameters (a DeepSpeed optimizer).
        self.optimizer_masters = optimizer is not None and _is_deepspeed(optimizer)
        self._unfused: dict[int, torch.Tensor] = {}
        if not self.optimizer_masters:
            return
        fp16_groups = getattr(optimizer, "fp16_groups", None)
        if fp16_groups is not None and hasattr(optimizer, "fp32_groups"):  # FP16_UnfusedOptimizer
            for lp_group, hp_group in zip(fp16_groups, optimizer.fp32_groups):
                for lp, hp in zip(lp_group, hp_group):
                    self._unfused[id(lp)] = hp
        # FP16_Optimizer (fused)
        elif fp16_groups is not None and hasattr(optimizer, "fp32_groups_flat"):
            for lp_group, flat in zip(fp16_groups, optimizer.fp32_groups_flat):
                offset = 0
                for lp in lp_group:
                    self._unfused[id(lp)] = flat.narrow(0, offset, lp.numel()).view_as(lp)
                    offset += lp.numel()

    def _in_deepspeed_fragments(self, param: torch.nn.Parameter) -> bool:
        """Whether DeepSpeed's ``safe_*_fp32_param`` accessors hold ``param``'s master (ZeRO 1–3, BF16)."""
        return self.optimizer_masters and (is_partitioned(param) or hasattr(param, "_hp_mapping"))

    def read_full(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The full B at full precision, identical on every rank (a collective under ZeRO-1/2/3)."""
        if self._in_deepspeed_fragments(param):
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(param).reshape(full_shape(param)).float()
        if id(param) in self._unfused:
            return self._unfused[id(param)].detach().float()
        if is_partitioned(param):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                return param.detach().float().clone().reshape(full_shape(param))
        return param.detach().float()

    @torch.no_grad()
    def write_(self, param: torch.nn.Parameter, full: torch.Tensor) -> None:
        """Set B's master copy, the parameter and its ZeRO-3 partition to ``full`` (B's whole shape).

        Every rank passes the same ``full``; under ZeRO-3 each writes only its own partition.
        """
        if is_partitioned(param):
            local = None
            if self.optimizer_masters:
                from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

                local = safe_get_local_fp32_param(param)
            count = param.ds_tensor.numel() if local is None else local.numel()
            start = count * tdist.get_rank(group=param.ds_process_group)
            piece = full.detach().reshape(-1).float()[start : start + count]
            device = param.ds_tensor.device if local is None else local.device
            padded = torch.zeros(count, dtype=torch.float32, device=device)
            padded[: piece.numel()] = piece.to(padded.device)
            if local is not None:
                safe_set_local_fp32_param(param, padded.view_as(local))
            param.ds_tensor.view(-1).copy_(padded.to(param.ds_tensor.dtype))
        elif self._in_deepspeed_fragments(param):
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(
                param, full.detach().float().reshape(param.shape).to(param.device)
            )
        elif id(param) in self._unfused:
            self._unfused[id(param)].copy_(full.reshape(param.shape))
        if param.data.numel():
            param.data.copy_(full.reshape(param.data.shape))

    def zero_(self, param: torch.nn.Parameter) -> None:
        """Zero B's master copy, the parameter, and its ZeRO-3 partition."""
        self.write_(param, torch.zeros(full_shape(param), dtype=torch.float32, device=param.device))
