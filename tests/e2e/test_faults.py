"""The fault suite: bad rates, divergence, preemption, a rank killed mid-save, a busy run.dir,
incompatible resumes, a full disk.

Each case ends with a non-zero exit and ONE ``falqon_dist: error:`` line (not one per rank), and
leaves the run directory as it was: the last good checkpoint, its config, no NaN in any FP8 byte.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from falqon_dist.distributed.safe_load import load_file
from falqon_dist.train.run_dir import RunDirLock
from tests import processes
from tests.distributed.launcher import free_port
from tests.e2e.conftest import MODEL_CACHE, QUICK, REPO, TRAIN, VENV_BIN, launch, read_metrics

SOLO = [*QUICK, "deepspeed.zero_stage=0"]


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [
        line for line in (proc.stdout + proc.stderr).splitlines() if "falqon_dist: error:" in line
    ]


def _nan_codes(ckpt_dir: Path) -> int:
    """E4M3 NaN codes (0x7F / 0xFF) in every FALQON qweight of every checkpoint under ``ckpt_dir``."""
    total = 0
    for states in ckpt_dir.glob("step_*/mp_rank_*_model_states.pt"):
        module = load_file(states)["module"]
        for name, tensor in module.items():
            if name.endswith("qweight"):
                total += int(((tensor & 0x7F) == 0x7F).sum())
    return total


@pytest.mark.parametrize("bad", ["lr", "deepspeed-json", "rank", "model-config"])
def test_a_bad_value_is_refused_once_before_any_work(bad, tmp_path):
    """An infinite rate, a DeepSpeed JSON with fp16 (DeepSpeed used to assert after the model load),
    a rank wider than the model's layers (used to fail after data and model load, naming no key), a
    corrupt config.json (used to print a traceback per rank)."""
    run = tmp_path / "run"
    if bad == "lr":
        override, message = "train.lr=inf", "train.lr must be a finite number"
    elif bad == "rank":
        override, message = (
            "method.rank=1000",
            "method.rank cannot exceed min(in_features, out_features) of a layer it converts, "
            "and 'model.layers.0.self_attn.q_proj'",
        )
    elif bad == "model-config":
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text("{not json")
        override = f"model.name_or_path={tmp_path / 'model'}"
        message = f"model.name_or_path='{tmp_path / 'model'}': its config.json cannot be read"
    else:
        ds_json = tmp_path / "ds.json"
        ds_json.write_text('{"fp16": {"enabled": true}}')
        override = f"deepspeed.config={ds_json}"
        message = f"deepspeed.config='{ds_json}': fp16.enabled=true is not supported"
    proc = launch("deepspeed", [*QUICK, override, f"run.dir={run}"], check=False, timeout=300)
    assert proc.returncode != 0
    errors = _errors(proc)
    assert len(errors) == 1 and message in errors[0], errors  # rank 0 only
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not run.exists()  # refused before anything was written


def test_a_bad_dataset_is_said_once_and_every_rank_leaves(tmp_path):
    """A malformed row is the same error on every rank, which used to print one "rank R failed"
    line (and a traceback file) per rank (nothing fitting max_length takes the same path)."""
    data = tmp_path / "d.jsonl"
    rows = ['{"prompt": "a", "response": "b"}'] * 20
    rows[6] = '{"prompt": "a"}'
    message = f"{data}: line 7: field 'response' must be a non-empty string"
    data.write_text("\n".join(rows) + "\n")
    proc = launch(
        "deepspeed",
        [
            *QUICK[:4],
            "data=jsonl",
            f"data.path={data}",
            "deepspeed.zero_stage=2",
            f"run.dir={tmp_path / 'run'}",
        ],
        check=False,
        timeout=300,
    )
    assert proc.returncode != 0
    errors = _errors(proc)
    assert len(errors) == 1 and message in errors[0] and "failed on" not in errors[0], errors
    assert "Traceback" not in proc.stdout + proc.stderr and not list(
        (tmp_path / "run").glob("error_rank*")
    )


def test_a_diverging_run_stops_and_never_writes_nan_into_the_backbone(tmp_path):
    """With a top-k merge that keeps them, B's unmerged rows grow until they overflow: the non-finite
    guard."""
    run = tmp_path / "run"
    proc = launch(
        "python",
        [
            *SOLO,
            "method.merge=topk_carry",
            "train.max_steps=20",
            "train.lr=1e30",
            "train.save_every=1",
            f"run.dir={run}",
        ],
        check=False,
        timeout=300,
    )
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    errors = _errors(proc)
    assert len(errors) == 1 and "consecutive steps with non-finite values" in errors[0], errors
    assert "Nothing non-finite was written into the FP8 backbone" in errors[0]
    steps = [r for r in read_metrics(run) if "loss" in r]
    assert len(steps) < 20  # stopped early
    assert _nan_codes(run / "checkpoints") == 0
    latest = (
        (run / "checkpoints" / "latest").read_text().strip()
        if (run / "checkpoints" / "latest").exists()
        else None
    )
    if latest is not None:  # the last checkpoint is from a step without non-finite values
        step = int(latest.split("_")[1])
        record = next(r for r in steps if r["step"] == step)
        assert record["loss"] == record["loss"] and record.get("nonfinite", 0) == 0, record


def test_a_diverging_every_row_run_saturates_warns_and_stops_at_saturation_abort(tmp_path):
    """Merging every row, B holds only the carry (zero where a sum clamped), so a huge rate clamps
    the weights at ±448 instead of overflowing: warned above train.saturation_warn, stopped above
    train.saturation_abort, never a NaN code."""
    run = tmp_path / "run"
    proc = launch(
        "python",
        [
            *SOLO,
            "train.max_steps=20",
            "train.lr=1e30",
            "train.saturation_abort=0.5",
            f"run.dir={run}",
        ],
        check=False,
        timeout=300,
    )
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    errors = _errors(proc)
    assert len(errors) == 1 and "clamped at ±448 (train.saturation_abort=0.5)" in errors[0], errors
    assert len([r for r in read_metrics(run) if "loss" in r]) < 20
    assert _nan_codes(run / "checkpoints") == 0


def test_a_busy_run_dir_fails_fast_naming_its_holder(tmp_path):
    run = tmp_path / "run"
    lock = RunDirLock(run)  # this test process is the "other run"
    try:
        proc = launch("python", [*SOLO, f"run.dir={run}"], check=False, timeout=300)
    finally:
        lock.release()
    assert proc.returncode == 1
    errors = _errors(proc)
    assert (
        len(errors) == 1
        and f"pid {os.getpid()}" in errors[0]
        and "in use by another run" in errors[0]
    ), errors
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing else written


def test_sigterm_to_the_deepspeed_launcher_alone_saves_and_stops_every_rank(tmp_path):
    """A scheduler signals the launcher's PID only: the ranks used to train on, orphaned. Now they
    finish the step, save, and exit; the run resumes from that checkpoint."""
    run = tmp_path / "run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FALQON_CACHE": MODEL_CACHE,
        "PYTHONWARNINGS": "ignore",
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
    }
    cmd = [
        str(VENV_BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        TRAIN,
        *QUICK,
        "train.max_steps=2000",
        f"run.dir={run}",
    ]
    # the group is killed if this fails
    with processes.ProcessGroup(cmd, cwd=REPO, env=env) as launcher:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            metrics = run / "metrics.jsonl"
            if (
                metrics.exists()
                and sum(1 for line in metrics.read_text().splitlines() if '"loss"' in line) >= 3
            ):
                break
            assert launcher.poll() is None, "".join(launcher.output())[-3000:]
            time.sleep(0.5)
        tree = _children(launcher.pid)  # deepspeed.launcher.launch, and the two ranks below it
        ranks = [
            p
            for p in tree
            if "launch/train.py" in _cmdline(p) and "deepspeed.launcher" not in _cmdline(p)
        ]
        assert len(ranks) == 2, [(p, _cmdline(p)) for p in tree]
        launcher.send_signal(signal.SIGTERM)
        launcher.proc.wait(timeout=60)
        stopped = time.monotonic()
        while any(_alive(p) for p in tree) and time.monotonic() - stopped < 90:
            time.sleep(0.5)
        assert not any(_alive(p) for p in tree), "ranks outlived their launcher"
    log = (run / "train.log").read_text()
    assert "preempted at step" in log and "resume with train.resume=true" in log, log[-2000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert 3 <= step < 2000
    proc = launch(
        "deepspeed",
        [*QUICK, f"train.max_steps={step + 2}", "train.resume=true", f"run.dir={run}"],
        timeout=400,
    )
    out = proc.stdout + proc.stderr
    assert f"resumed from {run / 'checkpoints' / latest} at step {step}" in out
    assert "the learning-rate schedule changes" in out  # max_steps changed: said, not silent


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training ranks under a deepspeed launcher (read from their environment)."""
    ranks = {}
    for pid in _children(launcher_pid):
        if "launch/train.py" in _cmdline(pid) and "deepspeed.launcher" not in _cmdline(pid):
            env = dict(
                item.split("=", 1)
                for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
                if "=" in item
            )
            ranks[int(env["RANK"])] = pid
    return ranks


def _latest(ckpt_dir: Path) -> str | None:
    pointer = ckpt_dir / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def test_a_rank_killed_while_a_checkpoint_is_written_ends_the_job_and_latest_stays_complete(
    tmp_path,
):
    """SIGKILL of one rank in the middle of a save (caught there: rank 1 is frozen with SIGSTOP
    while its step directory exists and ``latest`` does not name it, then killed). The whole job
    ends within seconds, ``latest`` still names the previous complete checkpoint, and the run
    resumes from it."""
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FALQON_CACHE": MODEL_CACHE,
        "PYTHONWARNINGS": "ignore",
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
    }
    cmd = [
        str(VENV_BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        TRAIN,
        *QUICK,
        "train.max_steps=2000",
        "train.save_every=1",
        "train.keep_checkpoints=3",
        f"run.dir={run}",
    ]
    with processes.ProcessGroup(cmd, cwd=REPO, env=env) as launcher:
        deadline, caught, ranks = time.monotonic() + 240, None, {}
        while caught is None and time.monotonic() < deadline:
            assert launcher.poll() is None, "".join(launcher.output())[-3000:]
            ranks = ranks or (_rank_pids(launcher.pid) if _latest(ckpt) else {})
            newest = max((p.name for p in ckpt.glob("step_*")), default=None) if ranks else None
            if newest is None or newest == _latest(ckpt):
                time.sleep(0.005)
                continue
            # rank 0 cannot mark the checkpoint latest without rank 1
            os.kill(ranks[1], signal.SIGSTOP)
            time.sleep(1.0)
            if (ckpt / newest).is_dir() and _latest(ckpt) != newest:
                caught = (newest, _latest(ckpt))
            else:  # rank 1 had finished its part: let it go on to the next save
                os.kill(ranks[1], signal.SIGCONT)
        assert caught is not None, "never caught rank 1 inside a save"
        killed = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        launcher.proc.wait(timeout=60)
        took = time.monotonic() - killed
        assert launcher.proc.returncode != 0
        while any(_alive(p) for p in ranks.values()) and time.monotonic() - killed < 60:
            time.sleep(0.2)
        assert not any(_alive(p) for p in ranks.values()), "a rank outlived the job"
    assert took < 30, f"the job took {took:.0f}s to end after a rank died"
    in_progress, previous = caught
    # the half-written checkpoint was never marked latest
    assert _latest(ckpt) == previous != in_progress
    saved = int(previous.split("_")[1])
    proc = launch(
        "deepspeed",
        [
            *QUICK,
            f"train.max_steps={saved + 2}",
            "train.save_every=1",
            "train.keep_checkpoints=3",
            "train.resume=true",
            f"run.dir={run}",
        ],
        timeout=400,
    )
    assert f"resumed from {ckpt / previous} at step {saved}" in proc.stdout + proc.stderr
    assert _latest(ckpt) == f"step_{saved + 2:08d}"


def test_an_incompatible_resume_fails_first_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    launch("python", [*SOLO, "train.max_steps=2", f"run.dir={run}"], timeout=300)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train.log"}
    proc = launch(
        "python",
        [
            *SOLO,
            "train.max_steps=4",
            "train.resume=true",
            "method.rank=8",
            "method.merge=paper",
            "method.topk=4",
            f"run.dir={run}",
        ],
        check=False,
        timeout=300,
    )
    assert proc.returncode == 1
    errors = _errors(proc)
    assert len(errors) == 1 and "method.rank: 16 -> 8" in errors[0], errors
    assert (
        "method.merge: 'every_row' -> 'paper'" in errors[0]
        and "method.topk: None -> 4" in errors[0]
    ), errors
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train.log"}
    assert after == before  # config.yaml, checkpoints, metrics: untouched
    # a different number of ranks is named too
    proc = launch(
        "deepspeed",
        [
            *QUICK,
            "deepspeed.zero_stage=0",
            "train.max_steps=4",
            "train.resume=true",
            f"run.dir={run}",
        ],
        check=False,
        timeout=300,
    )
    assert proc.returncode != 0
    errors = _errors(proc)
    assert len(errors) == 1 and "number of ranks: 1 -> 2" in errors[0], errors


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 8 MiB (room for about three checkpoints of the QUICK run) mounted under
    ``tmp_path``; skipped where this machine does not let the tests mount one (then the unit tests
    of the checkpoint writer cover a full disk with an injected ENOSPC)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` (as another job writing there would)."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        block = b"\0" * 65536
        try:
            while True:
                handle.write(block)
                handle.flush()
        except OSError:
            pass
    return filler


def test_a_disk_that_fills_up_stops_the_run_and_keeps_the_last_checkpoint(small_disk):
    """Two ways a disk fills up, on a real 8 MiB tmpfs with 2 ranks:

    1. between saves: the next checkpoint is refused before anything is written (one line on every
       rank's behalf, naming the path, the MiB needed and free);
    2. during a save (another writer takes the space while rank 0 is frozen inside it): the write
       fails with ENOSPC, the incomplete directory is removed, and the failing rank leaves at once,
       so the job ends in seconds, not at dist.timeout_s.

    Either way ``latest`` names the previous complete checkpoint."""
    run, ckpt = small_disk / "run", small_disk / "run" / "checkpoints"
    # 1. a filler leaves room for about one checkpoint and a half: the second save is refused
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (7 * 2**19))  # 3.5 MiB
    proc = launch(
        "deepspeed",
        [
            *QUICK,
            "train.max_steps=8",
            "train.save_every=2",
            "train.keep_checkpoints=5",
            f"run.dir={run}",
        ],
        check=False,
        timeout=300,
    )
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    errors = _errors(proc)
    assert (
        len(errors) == 1 and f"not enough space for checkpoint step_00000004 in {ckpt}" in errors[0]
    ), errors
    assert "MiB are free" in errors[0] and "nothing was written" in errors[0]
    assert _latest(ckpt) == "step_00000002" and not (ckpt / "step_00000004").exists()
    # ZeRO-2: every rank's part, complete
    files = sorted(p.name for p in (ckpt / "step_00000002").iterdir())
    assert files == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng_rank00000.pt",
        "rng_rank00001.pt",
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
    ], files
    for name in files:
        load_file(ckpt / "step_00000002" / name)  # complete, and readable without pickle
    ballast.unlink()
    # 2. the space goes while a save is under way
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FALQON_CACHE": MODEL_CACHE,
        "PYTHONWARNINGS": "ignore",
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
    }
    cmd = [
        str(VENV_BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        TRAIN,
        *QUICK,
        "train.max_steps=2000",
        "train.save_every=1",
        "train.keep_checkpoints=1",
        "train.resume=true",
        f"run.dir={run}",
    ]
    with processes.ProcessGroup(cmd, cwd=REPO, env=env) as launcher:
        deadline, ranks, filled = time.monotonic() + 240, {}, None
        while filled is None and time.monotonic() < deadline:
            assert launcher.poll() is None, "".join(launcher.output())[-3000:]
            ranks = ranks or _rank_pids(launcher.pid)
            latest = _latest(ckpt)
            newest = max((p.name for p in ckpt.glob("step_*")), default=None)
            if not ranks or newest is None or newest == latest:
                time.sleep(0.002)
                continue
            os.kill(ranks[0], signal.SIGSTOP)  # rank 0 writes the model and optimizer state
            time.sleep(0.5)
            if _latest(ckpt) == latest:  # inside the save of `newest`: take the space now
                filled = (newest, latest, _fill(small_disk))
            os.kill(ranks[0], signal.SIGCONT)
        assert filled is not None, "never caught rank 0 inside a save"
        resumed = time.monotonic()
        launcher.proc.wait(timeout=120)
        took = time.monotonic() - resumed
        stdout, stderr = launcher.output()
    in_progress, previous, _ = filled
    assert launcher.proc.returncode != 0
    assert took < 60, f"the job took {took:.0f}s to end after the disk filled up"
    errors = [line for line in (stdout + stderr).splitlines() if "falqon_dist: error:" in line]
    assert errors and all("the disk filled up" in e for e in errors), errors
    assert all(
        f"could not write checkpoint {in_progress}" in e
        or f"could not mark as the latest checkpoint {in_progress}" in e
        for e in errors
    ), errors
    assert f"the last good checkpoint is {ckpt / previous}" in errors[0]
    assert _latest(ckpt) == previous and not (ckpt / in_progress).exists()


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout.split()
    found = [int(p) for p in out]
    return found + [grandchild for child in found for grandchild in _children(child)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
