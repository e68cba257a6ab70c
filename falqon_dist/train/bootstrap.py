"""Process start-up shared by every launcher: argv clean-up, process group, one run directory.

* ``deepspeed script.py`` appends ``--local_rank=N``, which Hydra rejects; it is removed here (the
  launchers also export ``LOCAL_RANK``). ``--no_local_rank``, torchrun and plain ``python`` pass none.
* Plain ``python`` gets a 1-process group so the same DeepSpeed path runs everywhere.
* All ranks must write into ONE run directory: rank 0 picks ``runs/<timestamp>`` (unless ``run.dir``
  is given) and broadcasts it before Hydra composes the config.
* DeepSpeed's CPU communication op leaves a shared-memory segment per rank in /dev/shm forever; each
  rank unlinks its own once all have mapped them (:mod:`falqon_dist.distributed.shm_segments`).
* Nothing here waits silently or without bound (``dist.timeout_s``, read from the command line
  before Hydra runs): stale torch-extension build locks are cleared before DeepSpeed loads its ops,
  and every lock this process takes from then on records its owner, so it is known stale at once
  if this process dies while building (:mod:`falqon_dist.distributed.build_locks`); the rendezvous
  names the ranks that have not joined while it waits and when it gives up.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import sys

import torch
import torch.distributed as tdist
from omegaconf import OmegaConf

from falqon_dist.distributed.build_locks import clear_stale_build_locks, stamp_build_locks
from falqon_dist.distributed.rendezvous import rendezvous
from falqon_dist.distributed.shm_segments import release_own_segment, sweep_stale_segments
from falqon_dist.distributed.waits import announced, barrier

#: The shipped default of ``dist.timeout_s`` (conf/config.yaml owns it).
CONFIG_YAML = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "config.yaml")


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


def move_overrides(argv: list[str]) -> list[str]:
    """Overrides of a key that moved (:data:`~falqon_dist.train.config_migrations.MOVED_KEYS`) renamed to its
    new key, and FALQON's old merge keys (``method.topk=all``, ``method.unmerged``,
    ``method.carry_residual``) combined into one ``method.merge`` recipe
    (:func:`~falqon_dist.train.config_migrations.merge_overrides`), each with one notice on stderr from
    rank 0, so an existing command line keeps working. A combination no longer offered is one error
    line (from rank 0) and exit status 1, before any work."""
    from falqon_dist.train.config_errors import ConfigError
    from falqon_dist.train.config_migrations import MOVED_KEYS, merge_overrides

    rank0 = int(os.environ.get("RANK", "0")) == 0
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        new = MOVED_KEYS.get(key.lstrip("+~"))
        if sep and new:
            if rank0:
                print(
                    f"falqon_dist: {key.lstrip('+~')} is now {new}; read {arg!r} as {new}={value}",
                    file=sys.stderr,
                    flush=True,
                )
            arg = f"{new}={value}"
        out.append(arg)
    try:
        out, notice = merge_overrides(out)
    except ConfigError as error:
        if rank0:
            print(f"falqon_dist: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if notice and rank0:
        print(f"falqon_dist: {notice}", file=sys.stderr, flush=True)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timeout_from_overrides(argv: list[str]) -> float:
    """``dist.timeout_s`` from the Hydra overrides, else the shipped default; validated here because
    the process group starts before Hydra composes the config."""
    value = requested_override(argv, "dist.timeout_s")
    if value is None:
        value = OmegaConf.load(CONFIG_YAML).dist.timeout_s
    try:
        timeout = float(value)
    except (TypeError, ValueError):
        timeout = float("nan")
    if not timeout > 0 or timeout == float("inf"):
        raise SystemExit(
            f"falqon_dist: dist.timeout_s must be a positive number of seconds, got {value!r}"
        )
    return timeout


def init_process_group(timeout_s: float) -> None:
    """Initialize torch.distributed (gloo on CPU, nccl on CUDA), then DeepSpeed's communication layer.

    ``timeout_s`` bounds the rendezvous and every later collective. Our own rendezvous (a TCPStore
    as torch's ``env://`` builds it, plus a join key per rank) lets every rank say which ranks it is
    still waiting for; stale build locks are cleared before DeepSpeed JIT-loads its ops. DeepSpeed's
    CPU shared-memory segments are unlinked as soon as every rank has mapped them, so no run leaves
    RAM behind in /dev/shm (:mod:`falqon_dist.distributed.shm_segments`).
    """
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
    local_leader = os.environ.get("LOCAL_RANK", "0") == "0"
    stamp_build_locks()  # a lock this process takes names it: a run killed mid-build leaves a lock known stale
    clear_stale_build_locks(remove=local_leader, wait_s=timeout_s)
    if local_leader:
        sweep_stale_segments()
    timeout = dt.timedelta(seconds=timeout_s)
    backend = get_accelerator().communication_backend_name()
    if not tdist.is_initialized():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = rendezvous(rank, world, timeout_s)
        tdist.init_process_group(
            backend=backend, store=store, rank=rank, world_size=world, timeout=timeout
        )
    with announced("DeepSpeed's communication set-up (its CPU op may be building)"):
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    barrier("map each other's DeepSpeed shared-memory segments")
    release_own_segment()


def agree_run_dir(requested: str | None, root: str = "runs") -> str:
    """The run directory every rank will use: ``requested`` or rank 0's ``root/<timestamp>``."""
    choice = [requested or os.path.join(root, dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))]
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        with announced("rank 0 to choose the run directory (a broadcast to all ranks)"):
            tdist.broadcast_object_list(choice, src=0)
    return os.path.abspath(choice[0])


def requested_override(argv: list[str], key: str) -> str | None:
    """The value of ``key=value`` among Hydra overrides, if given."""
    prefix = f"{key}="
    for arg in argv:
        if arg.lstrip("+~").startswith(prefix):
            return arg.split("=", 1)[1]
    return None
