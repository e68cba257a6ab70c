"""A run directory someone hands you cannot run code: every reader refuses a crafted checkpoint.

One short 2-rank run; copies of its run directory are then tampered with as an attacker would
(a model-states file whose pickle runs a command, a ``latest`` pointer out of ``checkpoints/``) and
handed to each reader through its real command line: ``launch/export.py``, ``launch/eval.py`` and
``launch/train.py train.resume=true``. Each must fail before using the file, name it, and leave no
trace of the payload.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from falqon_dist.distributed.safe_load import load_file
from tests import processes
from tests.e2e.conftest import MODEL_CACHE, QUICK, REPO, launch

STEPS = 2


class Payload:
    """Unpickling this runs a shell command (what a crafted ``.pt`` file does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trust") / "run"
    launch("deepspeed", [*QUICK, f"train.max_steps={STEPS}", f"run.dir={run}"])
    return run


def tampered_copy(run_dir: Path, where: Path) -> tuple[Path, Path, Path]:
    """A copy of ``run_dir`` whose model-states file carries the payload; (copy, file, marker)."""
    copy = where / "run"
    shutil.copytree(run_dir, copy)
    states = (
        copy / "checkpoints" / f"step_{STEPS:08d}" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    )  # ZeRO-3
    marker = where / "payload-ran"
    torch.save({**load_file(states), "extra": Payload(marker)}, states)
    return copy, states, marker


def cli(script: str, args: list[str]) -> processes.subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "FALQON_CACHE": MODEL_CACHE,
    }
    return processes.run(
        [sys.executable, str(REPO / "launch" / script), *args], cwd=REPO, env=env, timeout=300
    )


@pytest.mark.parametrize("reader", ["export", "eval", "resume"])
def test_a_crafted_checkpoint_is_refused_by_every_reader(run_dir, tmp_path, reader):
    copy, states, marker = tampered_copy(run_dir, tmp_path)
    if reader == "export":
        proc = cli("export.py", [f"run.dir={copy}"])
    elif reader == "eval":
        proc = cli("eval.py", [f"path={copy}", "samples=4", "generate=0"])
    else:
        proc = launch(
            "deepspeed",
            [*QUICK, f"train.max_steps={STEPS + 1}", "train.resume=true", f"run.dir={copy}"],
            check=False,
        )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert f"{states}: refused to load" in output and "posix.system" in output, output[-3000:]
    assert not marker.exists(), "the payload ran"
    assert not (copy / "export").exists()
    if reader == "resume":  # said once, not once per rank
        assert output.count(f"{states}: refused to load") == 1, output[-3000:]


@pytest.mark.parametrize("pointer", ["../../elsewhere", "/etc"])
def test_a_latest_pointer_out_of_checkpoints_is_refused(run_dir, tmp_path, pointer):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "latest").write_text(pointer)
    proc = cli("export.py", [f"run.dir={copy}"])
    assert proc.returncode != 0 and f"holds {pointer!r}, not a checkpoint tag" in proc.stderr, (
        proc.stderr[-2000:]
    )
    proc = launch(
        "deepspeed",
        [*QUICK, f"train.max_steps={STEPS + 1}", "train.resume=true", f"run.dir={copy}"],
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and output.count(f"holds {pointer!r}, not a checkpoint tag") == 1, (
        output[-3000:]
    )
