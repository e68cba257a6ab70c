"""The sweep of DeepSpeed shm segments that earlier runs left: only this user's, only unused, only old."""

from __future__ import annotations

import os
import time

import pytest

from falqon_dist.distributed import shm_segments


@pytest.fixture
def shm_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(shm_segments, "SHM_DIR", tmp_path)
    return tmp_path


def _segment(directory, name: str, *, age_s: float, size: int = 4096):
    path = directory / name
    path.write_bytes(b"\0" * size)
    past = time.time() - age_s
    os.utime(path, (past, past))
    return path


def test_own_segment_follows_deepspeeds_name(monkeypatch, shm_dir):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "3")
    assert (
        shm_segments.own_segment()
        == shm_dir / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29500_3"
    )
    assert shm_segments.own_segment(0).name.endswith("_29500_0")


def test_release_unlinks_once_and_reports_nothing_when_absent(monkeypatch, shm_dir):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29501")
    path = _segment(shm_dir, f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29501_0", age_s=0)
    assert shm_segments.release_own_segment(0) == path and not path.exists()
    assert shm_segments.release_own_segment(0) is None  # GPUs, several hosts: DeepSpeed made none


def test_sweep_removes_only_old_unused_segments_of_this_user(shm_dir):
    uid = os.getuid()
    stale = _segment(
        shm_dir, f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_1000_0", age_s=3600, size=2**20
    )
    young = _segment(shm_dir, f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_1001_0", age_s=5)
    held = _segment(shm_dir, f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_1002_0", age_s=3600)
    other_user = _segment(
        shm_dir, f"deepspeed_allreduce_buffer_{uid + 1}_127.0.0.1_1003_0", age_s=3600
    )
    unrelated = _segment(shm_dir, "some_other_program", age_s=3600)
    lines: list[str] = []
    with open(held, "rb"):  # a live process (this one) holds it: in use
        removed = shm_segments.sweep_stale_segments(emit=lines.append)
    assert removed == [stale] and not stale.exists()
    assert young.exists() and held.exists() and other_user.exists() and unrelated.exists()
    assert (
        len(lines) == 1 and "removed 1 stale DeepSpeed shared-memory segment(s) (1 MiB" in lines[0]
    ), lines
    assert shm_segments.sweep_stale_segments(emit=lines.append) == [held]  # released now
    # quiet when clean
    assert shm_segments.sweep_stale_segments(emit=lines.append) == [] and len(lines) == 2
