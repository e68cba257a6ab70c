"""A run never waits silently: a stale DeepSpeed build lock is cleared, a missing rank is named."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tests import processes
from tests.distributed.launcher import free_port
from tests.e2e.conftest import MODEL_CACHE, QUICK, REPO, TRAIN, VENV_BIN, launch

SHM_OP = "deepspeed_shm_comm"


def _built_shm_op() -> Path | None:
    """This machine's build of DeepSpeed's CPU communication op, if any (copied to spare a rebuild)."""
    from falqon_dist.distributed.build_locks import extensions_root

    directory = extensions_root() / SHM_OP
    return directory if (directory / f"{SHM_OP}.so").exists() else None


def test_a_stale_build_lock_is_cleared_and_the_run_trains(tmp_path, monkeypatch):
    """A run killed while DeepSpeed JIT-built or loaded an op left ``<op>/lock``: the next run used to
    sleep forever right after "Setting accelerator to CPU". Now it removes the lock, says so, and trains.

    The lock is planted in an op directory of a temporary ``TORCH_EXTENSIONS_DIR`` (torch then uses
    ``$TORCH_EXTENSIONS_DIR/<op>/lock``); DeepSpeed's CPU communication op is linked in from this
    machine's build, so the run does not spend minutes compiling it again.
    """
    root = tmp_path / "torch_extensions"
    root.mkdir()
    built = _built_shm_op()
    if built is not None:
        (root / SHM_OP).symlink_to(built, target_is_directory=True)
    lock = root / "falqon_killed_build" / "lock"
    lock.parent.mkdir()
    (lock.parent / "falqon_killed_build.so").write_bytes(b"")
    lock.write_text("")
    past = time.time() - 3600  # left behind an hour ago
    for path in (*lock.parent.iterdir(), lock.parent):
        os.utime(path, (past, past))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    start = time.monotonic()
    proc = launch(
        "deepspeed",
        [*QUICK, "train.max_steps=2", f"run.dir={tmp_path / 'run'}", "dist.timeout_s=120"],
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert f"removed the stale build lock {lock}" in out, out[-3000:]
    assert out.count(f"removed the stale build lock {lock}") == 1  # one host, one remover
    assert not lock.exists() and (tmp_path / "run" / "checkpoints" / "latest").exists()
    print(f"trained past a stale lock in {time.monotonic() - start:.0f}s")


def test_a_rank_that_never_starts_is_named_within_the_bound(tmp_path):
    """A 2-rank job whose rank 1 never starts: rank 0 exits non-zero within dist.timeout_s (plus
    start-up), with one line naming rank 1, instead of gloo's silent 30 minutes."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FALQON_CACHE": MODEL_CACHE,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
    }
    start = time.monotonic()
    proc = processes.run(
        [sys.executable, TRAIN, *QUICK, f"run.dir={tmp_path / 'run'}", "dist.timeout_s=10"],
        cwd=REPO,
        env=env,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    err = proc.stderr
    assert proc.returncode == 1, (proc.returncode, err[-3000:])
    assert "falqon_dist: error: rank 0: rank(s) 1 of 2 did not join the rendezvous" in err, err[
        -3000:
    ]
    assert "waiting" in err and "rank(s) 1 of 2 to join" in err  # it said so while it waited
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written
    assert elapsed < 60, elapsed
