"""Waits that say what they wait for and give up in bounded time: notices, build locks, rendezvous."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from falqon_dist.distributed import build_locks
from falqon_dist.distributed.build_locks import (
    StaleLockError,
    clear_stale_build_locks,
    extensions_root,
    lock_holders,
)
from falqon_dist.distributed.rendezvous import RendezvousError, rendezvous
from falqon_dist.distributed.waits import announced
from tests.distributed.launcher import free_port


def test_a_long_wait_is_announced_and_a_short_one_is_not():
    lines: list[str] = []
    with announced("the slow thing", first_s=0.1, every_s=0.1, emit=lines.append):
        time.sleep(0.45)
    assert 2 <= len(lines) <= 5 and all("for the slow thing (since " in line for line in lines), (
        lines
    )
    quiet: list[str] = []
    with announced("the quick thing", first_s=0.5, emit=quiet.append):
        pass
    time.sleep(0.6)
    assert quiet == []


def test_the_extensions_root_is_torchs(monkeypatch, tmp_path):
    """Pins the torch internal the lock check mirrors: cpp_extension's build directory layout."""
    from torch.utils import cpp_extension

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert (
        Path(cpp_extension._get_build_directory("falqon_probe", verbose=False)).parent
        == extensions_root()
    )
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert (
        Path(cpp_extension._get_build_directory("falqon_probe", verbose=False)).parent == tmp_path
    )


def _plant(root: Path, op: str = "deepspeed_shm_comm", age_s: float = 3600) -> Path:
    build = root / op
    build.mkdir(parents=True)
    (build / f"{op}.so").write_bytes(b"\0")
    lock = build / "lock"
    lock.write_text("")
    past = time.time() - age_s
    for path in (build / f"{op}.so", lock, build):
        os.utime(path, (past, past))
    return lock


def test_a_stale_lock_is_removed_with_a_line_naming_it(tmp_path):
    lock = _plant(tmp_path)
    lines: list[str] = []
    assert clear_stale_build_locks(tmp_path, emit=lines.append) == [lock]
    assert not lock.exists()
    assert any(str(lock) in line and "stale" in line for line in lines), lines


def test_a_lock_held_by_a_live_process_is_waited_for_then_named(tmp_path):
    lock = _plant(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, time; fd = os.open({str(lock)!r}, os.O_RDONLY); print('ok', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        assert lock_holders(lock) == [holder.pid]
        lines: list[str] = []
        start = time.monotonic()
        with pytest.raises(StaleLockError, match=f"rm {lock}"):
            clear_stale_build_locks(tmp_path, wait_s=1.0, emit=lines.append)
        assert time.monotonic() - start < 10
        assert lock.exists()  # a live holder's lock is never removed
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_released_while_waiting_ends_the_wait(tmp_path):
    lock = _plant(tmp_path, age_s=0)  # fresh: its directory is still changing, so it is waited for
    threading.Timer(0.5, lock.unlink).start()
    assert clear_stale_build_locks(tmp_path, quiet_s=30, wait_s=10, emit=lambda _: None) == []


def test_only_the_remover_removes(tmp_path, monkeypatch):
    lock = _plant(tmp_path)
    # "local rank 0" clears it
    monkeypatch.setattr(build_locks.time, "sleep", lambda _: lock.unlink())
    assert clear_stale_build_locks(tmp_path, remove=False, emit=lambda _: None) == []
    assert not lock.exists()


def _sleeper() -> subprocess.Popen:
    """A live process on this host that holds no lock file open (as a builder whose descriptors
    this user cannot see)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _stamp(lock: Path, line: str) -> None:
    past = lock.stat().st_mtime
    lock.write_text(line)
    os.utime(lock, (past, past))  # the stamp does not make the build directory look busy


def test_a_lock_whose_builder_on_this_host_died_is_removed_at_once(tmp_path):
    """A builder killed mid-build (SIGKILL: no release) leaves a lock naming it: removed at once, even
    though its build directory changed a moment ago (the old check waited for 30 quiet seconds)."""
    lock = tmp_path / "falqon_op" / "lock"
    lock.parent.mkdir()
    code = (
        "import sys, time; from torch.utils.file_baton import FileBaton\n"
        "from falqon_dist.distributed.build_locks import stamp_build_locks\n"
        f"stamp_build_locks(); assert FileBaton({str(lock)!r}).try_acquire(); print('building', flush=True); "
        "time.sleep(60)"
    )
    builder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert any(line.strip() == "building" for line in iter(builder.stdout.readline, ""))
        owner = build_locks.read_owner(lock)
        assert (
            owner is not None
            and owner["pid"] == str(builder.pid)
            and owner["host"] == build_locks.this_host()["host"]
        )
        # alive: waited for, never removed
        with pytest.raises(StaleLockError, match=f"held by pid {builder.pid}"):
            clear_stale_build_locks(tmp_path, wait_s=0.5, emit=lambda _: None)
    finally:
        builder.kill()
        builder.wait()
    lines: list[str] = []
    start = time.monotonic()
    assert clear_stale_build_locks(tmp_path, wait_s=30, emit=lines.append) == [lock]
    assert time.monotonic() - start < 5 and not lock.exists()
    assert any(
        f"its builder, pid {builder.pid} on this host" in line and "is gone" in line
        for line in lines
    ), lines


def test_a_live_builder_on_this_host_is_waited_for_however_quiet(tmp_path):
    """A lock an hour quiet whose recorded builder still runs here (its descriptors invisible to this
    user): the old check removed it; it is a live build."""
    lock = _plant(tmp_path)
    builder = _sleeper()
    try:
        _stamp(lock, build_locks.owner_line(builder.pid))
        with pytest.raises(
            StaleLockError, match=f"built by pid {builder.pid} on this host since .*, still running"
        ):
            clear_stale_build_locks(tmp_path, wait_s=1.0, emit=lambda _: None)
        assert lock.exists()
    finally:
        builder.kill()
        builder.wait()


def test_a_reused_pid_is_not_the_builder(tmp_path):
    lock = _plant(tmp_path, age_s=0)
    # this process is alive, but started after "the builder"
    line = build_locks.owner_line(os.getpid())
    _stamp(lock, line.replace(f"start={build_locks._start_time(os.getpid())}", "start=1"))
    assert clear_stale_build_locks(tmp_path, wait_s=5, emit=lambda _: None) == [lock]


def test_a_lock_of_another_host_is_stale_only_after_the_build_bound(tmp_path):
    """A build on another host of a shared file system writes nothing for minutes while nvcc runs:
    the old check took it for stale after 30 s and removed the lock of a live build."""
    here = build_locks.this_host()["host"]
    lock = _plant(tmp_path, age_s=600)  # ten quiet minutes
    _stamp(lock, build_locks.owner_line(os.getpid()).replace(f"host={here}", "host=gpu-node-7"))
    lines: list[str] = []
    with pytest.raises(
        StaleLockError,
        match=f"built by pid {os.getpid()} on gpu-node-7 since .*, which this host "
        "cannot check.*stale after 1800s without a change.*running on any host",
    ):
        clear_stale_build_locks(tmp_path, wait_s=1.0, emit=lines.append)
    assert lock.exists() and not any("removed" in line for line in lines)
    # quiet for longer than any build: stale
    past = time.time() - 2 * build_locks.BUILD_QUIET_BOUND_S
    for path in (*lock.parent.iterdir(), lock.parent):
        os.utime(path, (past, past))
    assert clear_stale_build_locks(tmp_path, emit=lines.append) == [lock]
    assert any(
        "on gpu-node-7" in line and "removed the stale build lock" in line for line in lines
    ), lines


def test_an_unknown_builders_lock_quiet_for_minutes_is_still_a_build(tmp_path):
    lock = _plant(tmp_path, age_s=120)  # empty: made by a process that does not stamp (plain torch)
    with pytest.raises(StaleLockError, match="its builder is unknown.*changed 1[0-9]{2}s ago"):
        clear_stale_build_locks(tmp_path, wait_s=0.5, emit=lambda _: None)
    assert lock.exists()


def test_stamping_records_the_owner_in_torchs_own_baton(tmp_path, monkeypatch):
    """Pins the torch internals the stamp relies on: cpp_extension takes its baton through this class,
    whose try_acquire creates the file and whose release removes it without reading it."""
    from torch.utils import cpp_extension
    from torch.utils.file_baton import FileBaton

    assert cpp_extension.FileBaton is FileBaton
    monkeypatch.setattr(FileBaton, "try_acquire", FileBaton.try_acquire)  # undone after the test
    build_locks.stamp_build_locks()
    stamping = FileBaton.try_acquire
    build_locks.stamp_build_locks()
    assert FileBaton.try_acquire is stamping  # idempotent: one wrapper, one stamp per baton
    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    baton, rival = FileBaton(str(lock)), FileBaton(str(lock))
    assert baton.try_acquire() and not rival.try_acquire()
    owner = build_locks.read_owner(lock)
    assert (
        owner is not None
        and owner["pid"] == str(os.getpid())
        and owner["start"] == build_locks._start_time(os.getpid())
    )
    assert build_locks._state(lock, 1800)[0] == "held"  # this very process builds
    baton.release()
    assert not lock.exists()


def _spawn_rank(rank: int, world: int, port: int, timeout_s: float) -> subprocess.Popen:
    code = (
        "import datetime, os, sys; import torch.distributed as tdist\n"
        "from falqon_dist.distributed.rendezvous import rendezvous, RendezvousError\n"
        f"os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='{port}')\n"
        f"try:\n    store = rendezvous({rank}, {world}, {timeout_s})\n"
        "except RendezvousError as e:\n    print('ERROR', e); sys.exit(3)\n"
        # what launch/train.py does next: the process group on that store (it keeps rank 0's store up)
        f"tdist.init_process_group('gloo', store=store, rank={rank}, world_size={world}, "
        "timeout=datetime.timedelta(seconds=30))\n"
        "tdist.barrier(); print('joined'); tdist.destroy_process_group()\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_rendezvous_of_all_ranks_completes():
    port = free_port()
    ranks = [_spawn_rank(r, 3, port, 30) for r in range(3)]
    outputs = [p.communicate(timeout=60) for p in ranks]
    assert all(p.returncode == 0 for p in ranks), outputs
    assert all("joined" in out for out, _ in outputs)


def test_rendezvous_names_the_rank_that_never_joins(monkeypatch):
    port = free_port()
    start = time.monotonic()
    # joins (its interpreter may take seconds to start), then waits
    rank2 = _spawn_rank(2, 3, port, 20)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    with pytest.raises(RendezvousError, match=r"rank\(s\) 1 of 3 did not join .* within 15s"):
        rendezvous(0, 3, 15)
    out, _ = rank2.communicate(timeout=60)
    # rank 2 names rank 1 too, or (when rank 0 gave up first) says its host went away
    assert rank2.returncode == 3 and ("rank(s) 1 of 3 did not join" in out or "went away" in out), (
        out
    )
    assert time.monotonic() - start < 40


def test_rendezvous_without_rank_0_says_the_host_did_not_answer(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(RendezvousError, match="did not answer within 2s"):
        rendezvous(1, 2, 2)
