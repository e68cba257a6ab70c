"""2 ranks through the product's process-group start-up, under the deepspeed launcher (which exports
LOCAL_SIZE, so DeepSpeed's CPU shm op creates its segments). Run by test_shm_segments.py.

Prints whether each rank still maps its segment under an unlinked name, then checks DeepSpeed's shm
all-reduce still sums correctly after every name is gone (the mappings outlive the names).
"""

from __future__ import annotations

import os
from pathlib import Path

import deepspeed.comm as dscomm
import torch
import torch.distributed as tdist

from falqon_dist.distributed.shm_segments import own_segment
from falqon_dist.train.bootstrap import init_process_group

if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    assert os.environ.get("LOCAL_SIZE") == os.environ["WORLD_SIZE"], (
        "the deepspeed launcher exports LOCAL_SIZE"
    )
    init_process_group(300.0)
    segment = own_segment()
    maps = [
        line.strip()
        for line in Path("/proc/self/maps").read_text().splitlines()
        if str(segment) in line
    ]
    # it existed; its name is gone
    mapped_deleted = bool(maps) and all(line.endswith("(deleted)") for line in maps)
    print(f"CHECK rank{rank} segment {segment} mapped-and-unlinked={mapped_deleted}", flush=True)
    tdist.barrier()
    remaining = sorted(str(p) for p in Path("/dev/shm").glob(f"{segment.name[: -len(str(rank))]}*"))
    print(f"CHECK rank{rank} remaining {remaining}", flush=True)
    uses_op = hasattr(torch.ops, "deepspeed") and hasattr(
        torch.ops.deepspeed, "inference_all_reduce_"
    )
    tensor = torch.full((1000,), float(rank + 1))
    dscomm.inference_all_reduce(tensor)
    total = sum(range(1, tdist.get_world_size() + 1))
    verdict = "ok" if torch.equal(tensor, torch.full_like(tensor, total)) else "WRONG"
    print(f"CHECK rank{rank} shm-op={uses_op} all-reduce {verdict}", flush=True)
    tdist.barrier()
