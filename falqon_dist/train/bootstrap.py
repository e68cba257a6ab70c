"""Process start-up shared by every launcher: argv clean-up, process group, one run directory.

* ``deepspeed script.py`` appends ``--local_rank=N``, which Hydra rejects; it is removed here (the
  launchers also export ``LOCAL_RANK``). ``--no_local_rank``, torchrun and plain ``python`` pass none.
* Plain ``python`` gets a 1-process group so the same DeepSpeed path runs everywhere.
* All ranks must write into ONE run directory: rank 0 picks ``runs/<timestamp>`` (unless ``run.dir``
  is given) and broadcasts it before Hydra composes the config.
"""

from __future__ import annotations

import datetime as dt
import os
import socket

import torch
import torch.distributed as tdist


def strip_local_rank(argv: list[str]) -> list[str]:
    """Remove ``--local_rank=N`` / ``--local_rank N`` (exporting it as LOCAL_RANK if unset)."""
    cleaned, skip_next = [], False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip_next = True
        else:
            cleaned.append(arg)
    return cleaned


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group() -> None:
    """Initialize torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "WORLD_SIZE" not in os.environ:  # plain python: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # One GPU per rank from the start: NCCL collectives before deepspeed.initialize (the run-dir
    # broadcast, the model build barrier) use the current device, which would otherwise be GPU 0 on
    # every rank. DeepSpeed itself only sets it inside initialize().
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if not tdist.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)


def agree_run_dir(requested: str | None, root: str = "runs") -> str:
    """The run directory every rank will use: ``requested`` or rank 0's ``root/<timestamp>``."""
    choice = [requested or os.path.join(root, dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))]
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.broadcast_object_list(choice, src=0)
    return os.path.abspath(choice[0])


def requested_override(argv: list[str], key: str) -> str | None:
    """The value of ``key=value`` among Hydra overrides, if given."""
    prefix = f"{key}="
    for arg in argv:
        if arg.lstrip("+~").startswith(prefix):
            return arg.split("=", 1)[1]
    return None
