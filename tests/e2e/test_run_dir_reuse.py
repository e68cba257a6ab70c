"""A run directory is never written through a symbolic link, and a fresh run never lands on an old
run: through the real launcher, it is refused once, before any work, changing nothing; with
``run.overwrite=true`` the old run is moved aside, byte for byte, where one line says."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.e2e.conftest import QUICK, launch, read_metrics

SOLO = [*QUICK, "deepspeed.zero_stage=0"]


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [
        line for line in (proc.stdout + proc.stderr).splitlines() if "falqon_dist: error:" in line
    ]


def _snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry under ``directory`` (relative path): kind, bytes, mtime (ns)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        body = (
            os.readlink(path)
            if path.is_symlink()
            else path.read_bytes()
            if path.is_file()
            else None
        )
        out[str(path.relative_to(directory))] = (body, info.st_mtime_ns)
    return out


def test_a_fresh_run_into_a_used_run_dir_is_refused_and_run_overwrite_moves_the_old_run_aside(
    tmp_path,
):
    real = tmp_path / "real"
    real.mkdir()
    run = tmp_path / "run"
    run.symlink_to(real, target_is_directory=True)  # a symlinked run.dir is fine: users do that
    launch("python", [*SOLO, "train.max_steps=2", f"run.dir={run}"], timeout=300)
    before = _snapshot(real)
    assert {"config.yaml", "metrics.jsonl", "train.log", "checkpoints/latest"} <= set(before)

    # a second fresh run, on 2 ranks: refused once, before the data or the model, changing nothing
    proc = launch(
        "deepspeed", [*QUICK, "train.max_steps=3", f"run.dir={run}"], check=False, timeout=300
    )
    assert proc.returncode != 0
    errors = _errors(proc)
    assert len(errors) == 1, errors  # rank 0 only
    assert (
        f"run.dir {run} already holds a run (checkpoints, config.yaml, metrics.jsonl, train.log)"
        in errors[0]
    )
    assert "Continue it with train.resume=true, start over with run.overwrite=true" in errors[0]
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "data=synthetic" not in out  # before any work
    assert _snapshot(real) == before

    # both ways out at once: named, nothing changed
    proc = launch(
        "python",
        [*SOLO, "train.resume=true", "run.overwrite=true", f"run.dir={run}"],
        check=False,
        timeout=300,
    )
    errors = _errors(proc)
    assert proc.returncode == 1 and len(errors) == 1, errors
    assert "train.resume=true and run.overwrite=true contradict each other" in errors[0]
    assert _snapshot(real) == before

    # start over: the old run moves aside, whole, and the new one is alone in run.dir
    proc = launch(
        "python", [*SOLO, "train.max_steps=3", "run.overwrite=true", f"run.dir={run}"], timeout=300
    )
    moved = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if "moved the previous run" in line
    ]
    assert len(moved) == 1, moved
    prefix = (
        f"falqon_dist: run.overwrite=true: moved the previous run in {run} (checkpoints, config.yaml, "
        f"metrics.jsonl, train.log) to "
    )
    assert moved[0].startswith(prefix), moved
    aside = Path(moved[0][len(prefix) :])
    assert aside.parent == tmp_path and aside.name.startswith("real.old-")
    old_run = {name: body for name, (body, _) in before.items() if name != ".lock"}
    # every byte, where it said
    assert {name: body for name, (body, _) in _snapshot(aside).items()} == old_run
    assert run.is_symlink() and [m["step"] for m in read_metrics(run) if "loss" in m] == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    # the new run's log says it too
    assert "moved the previous run" in (run / "train.log").read_text()


def test_a_symbolic_link_in_the_run_dir_is_refused_and_its_target_untouched(tmp_path):
    """``run.dir/train.log -> victim``: the run used to append its whole log to the victim."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").symlink_to(victim)
    proc = launch(
        "python", [*SOLO, "train.max_steps=2", f"run.dir={run}"], check=False, timeout=300
    )
    assert proc.returncode == 1
    errors = _errors(proc)
    assert len(errors) == 1, errors
    assert errors[0].endswith(
        f"{run / 'train.log'} is a symbolic link; falqon_dist writes only regular files in "
        "a run directory — remove it"
    )
    assert victim.read_text() == "precious\n"
    # nothing else written, not even the lock
    assert [p.name for p in run.iterdir()] == ["train.log"]
