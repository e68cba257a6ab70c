"""End-to-end tests through the real launchers (python, deepspeed, torchrun) on CPU/gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import processes
from tests.distributed.launcher import free_port

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TRAIN = str(REPO / "launch" / "train.py")


def _model_cache() -> str:
    from falqon_dist.models.tiny import default_cache_dir

    return str(default_cache_dir())


#: Resolved once, so tests that move HOME still reuse the built tiny model.
MODEL_CACHE = _model_cache()

#: Small, fast settings for the embedded default.
QUICK = [
    "train.max_steps=4",
    "train.micro_batch_size=4",
    "train.eval_samples=16",
    "train.eval_generate_samples=8",
    "data.num_train=64",
    "data.num_eval=32",
]


def launch(
    kind: str, args: list[str], *, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run launch/train.py with ``kind`` = python | deepspeed | deepspeed-no-local-rank | torchrun."""
    if kind == "python":
        cmd = [sys.executable, TRAIN]
    elif kind.startswith("deepspeed"):
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
        if kind == "deepspeed-no-local-rank":
            cmd.append("--no_local_rank")
        cmd.append(TRAIN)
    elif kind == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            TRAIN,
        ]
    else:
        raise ValueError(kind)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "FALQON_CACHE": MODEL_CACHE,
    }
    env.pop("WANDB_MODE", None)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    proc = processes.run([*cmd, *args], cwd=REPO, env=env, timeout=timeout)
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(cmd + args)} exited {proc.returncode}\n{(proc.stdout + proc.stderr)[-6000:]}"
        )
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]


@pytest.fixture(scope="session", autouse=True)
def tiny_model_built():
    """Build (or reuse) the embedded tiny model once, before any launcher test times anything."""
    from falqon_dist.models import build_tiny_model

    return build_tiny_model()
