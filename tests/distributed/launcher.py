"""Run a worker script on 2 gloo ranks (torchrun, or the deepspeed launcher) and fail the test with
its output on error."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from tests import processes

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(
    script: Path, *args: str, nproc: int = 2, timeout: int = 600, launcher: str = "torchrun"
) -> str:
    """``torchrun --nproc_per_node nproc script args`` (or ``deepspeed --num_gpus nproc
    --no_local_rank``, which also exports LOCAL_SIZE); returns combined output, asserts exit 0."""
    if launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
        ]
    elif launcher == "deepspeed":
        cmd = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(free_port()),
            "--no_local_rank",
        ]
    else:
        raise ValueError(launcher)
    cmd += [str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    proc = processes.run(cmd, cwd=REPO, env=env, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-8000:]}"
    return output
