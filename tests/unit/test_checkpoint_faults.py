"""A full disk never costs the last good checkpoint: refused before writing, or cleaned up mid-write."""

from __future__ import annotations

import errno
from collections import namedtuple
from pathlib import Path

import pytest

from falqon_dist.distributed import checkpoint

Usage = namedtuple("Usage", "total used free")


class FakeEngine:
    """``save_checkpoint`` writes ``size`` bytes into the tag's directory, or fails after half of them."""

    def __init__(self, size: int = 4096, fail: OSError | None = None) -> None:
        self.size, self.fail, self.calls = size, fail, 0

    def save_checkpoint(
        self, save_dir: str, tag: str, client_state: dict, save_latest: bool
    ) -> None:
        self.calls += 1
        target = Path(save_dir) / tag / "mp_rank_00_model_states.pt"
        if self.fail is not None:
            target.write_bytes(b"\0" * (self.size // 2))
            raise self.fail
        target.write_bytes(b"\0" * self.size)


@pytest.fixture
def saved(tmp_path):
    """A checkpoint directory whose latest complete checkpoint is step 1."""
    ckpt = tmp_path / "checkpoints"
    assert checkpoint.save(FakeEngine(), ckpt, 1) == "step_00000001"
    return ckpt


def test_too_little_space_is_refused_before_anything_is_written(saved, monkeypatch):
    monkeypatch.setattr(
        checkpoint.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000)
    )
    engine = FakeEngine()
    with pytest.raises(checkpoint.CheckpointSpaceError) as err:
        checkpoint.save(engine, saved, 2)
    message = str(err.value)
    assert (
        "not enough space for checkpoint step_00000002" in message
        and "nothing was written" in message
    )
    assert (
        f"the last good checkpoint is {saved / 'step_00000001'}" in message
        and "train.resume=true" in message
    )
    assert engine.calls == 0 and not (saved / "step_00000002").exists()
    assert checkpoint.latest_tag(saved) == "step_00000001"


def test_the_first_checkpoint_is_checked_against_the_callers_estimate(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: Usage(10**9, 0, 10**6))
    with pytest.raises(checkpoint.CheckpointSpaceError, match="the last good checkpoint is none"):
        checkpoint.save(FakeEngine(), tmp_path / "ckpt", 1, expected_bytes=10**7)
    assert (
        checkpoint.save(FakeEngine(), tmp_path / "ckpt", 1, expected_bytes=10**5) == "step_00000001"
    )


@pytest.mark.parametrize(
    "error, cause",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "the disk filled up"),
        (OSError(errno.EIO, "Input/output error"), "OSError"),
    ],
)
def test_a_write_that_fails_midway_is_removed_and_latest_stays(saved, error, cause):
    with pytest.raises(checkpoint.CheckpointWriteError) as err:
        checkpoint.save(FakeEngine(fail=error), saved, 2)
    message = str(err.value)
    assert "rank 0 could not write checkpoint step_00000002" in message and cause in message
    if error.errno == errno.ENOSPC:  # what was needed against what was there
        assert "MiB expected" in message and "MiB were free when the save began" in message
    assert f"the last good checkpoint is {saved / 'step_00000001'}" in message
    assert not (saved / "step_00000002").exists()  # its space is given back
    assert checkpoint.latest_tag(saved) == "step_00000001"
    # untouched
    assert (saved / "step_00000001" / "mp_rank_00_model_states.pt").stat().st_size == 4096


def test_saving_the_latest_step_again_is_refused_and_never_rewrites_it(saved):
    """A save of the step ``latest`` already names (another run's checkpoint in a reused directory)
    is an error, not a silent skip, and the complete checkpoint is left as it is."""
    engine = FakeEngine()
    with pytest.raises(checkpoint.CheckpointWriteError, match="already exists and is the latest"):
        checkpoint.save(engine, saved, 1)
    assert engine.calls == 0 and (saved / "step_00000001" / "mp_rank_00_model_states.pt").is_file()
    assert checkpoint.latest_tag(saved) == "step_00000001"


def test_a_directory_a_crashed_save_left_is_cleared_before_writing(saved):
    """``step_2`` exists but is not ``latest`` (a save that died): its stale files must not mix into
    the new checkpoint (an extra rank's RNG file would change the saved world size)."""
    leftover = saved / "step_00000002"
    leftover.mkdir()
    (leftover / "rng_rank00007.pt").write_bytes(b"stale")
    assert checkpoint.save(FakeEngine(), saved, 2) == "step_00000002"
    assert (
        not (leftover / "rng_rank00007.pt").exists()
        and checkpoint.latest_tag(saved) == "step_00000002"
    )


def test_a_latest_pointer_that_cannot_be_written_leaves_the_previous_one(saved, monkeypatch):
    """The disk fills up between the checkpoint's files and its ``latest`` pointer: the new
    checkpoint is removed (never marked, its space given back), ``latest`` stays."""

    def no_space(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_atomic_write_text", no_space)
    with pytest.raises(checkpoint.CheckpointWriteError) as err:
        checkpoint.save(FakeEngine(), saved, 2)
    assert "rank 0 could not mark as the latest checkpoint step_00000002" in str(err.value)
    assert "the disk filled up" in str(err.value)
    assert (
        not (saved / "step_00000002").exists() and checkpoint.latest_tag(saved) == "step_00000001"
    )
