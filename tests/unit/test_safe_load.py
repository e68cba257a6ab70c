"""No checkpoint file we read can run code; ``latest`` cannot point out of ``checkpoints/``.

The attack: a ``.pt`` file whose pickle calls ``os.system`` (here: a function that creates a marker
file) when it is unpickled. Every read path must refuse it, name it, and leave no marker.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from falqon_dist.distributed import checkpoint
from falqon_dist.distributed.safe_load import (
    ALLOWED,
    NUMPY_ARRAY,
    SafeCheckpointEngine,
    UnsafeCheckpointError,
    allowed_globals,
    load_file,
    use_safe_loads,
    weights_only_loads,
)


class _RunsCode:
    """Unpickling this calls ``os.system`` — what an attacker's checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_file(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, path)
    return path


def test_every_allowlisted_class_exists_in_this_deepspeed():
    """The allowlist names DeepSpeed internals: each must still be there (pinned range)."""
    assert len(allowed_globals()) == len(ALLOWED)


def test_load_file_refuses_a_file_that_runs_code_and_names_it(tmp_path):
    marker = tmp_path / "pwned"
    bad = crafted_file(tmp_path / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(UnsafeCheckpointError) as caught:
        load_file(bad)
    message = str(caught.value)
    assert str(bad) in message and "system" in message and "refused" in message
    assert not marker.exists()


def test_load_file_reads_tensors_and_the_allowlisted_deepspeed_classes(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "optim.pt"
    torch.save({"scaler": LossScaler(1.0), "stage": ZeroStageEnum(2), "t": torch.arange(3)}, path)
    state = load_file(path)
    assert isinstance(state["scaler"], LossScaler) and state["stage"] == ZeroStageEnum(2)
    assert torch.equal(state["t"], torch.arange(3))


def test_weights_only_loads_forces_the_rule_on_code_that_asks_for_pickle(tmp_path):
    """Library code calling ``torch.load(..., weights_only=False)`` inside is refused too, and the
    offending file of the directory is named."""
    marker = tmp_path / "pwned"
    crafted_file(tmp_path / "ckpt" / "zero_pp_rank_1_mp_rank_00_model_states.pt", marker)
    torch.save({"ok": torch.ones(1)}, tmp_path / "ckpt" / "a_fine_file.pt")
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with (
        pytest.raises(UnsafeCheckpointError, match="zero_pp_rank_1_mp_rank_00_model_states.pt"),
        weights_only_loads(tmp_path / "ckpt"),
    ):
        torch.load(
            tmp_path / "ckpt" / "zero_pp_rank_1_mp_rank_00_model_states.pt", weights_only=False
        )
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before


def test_the_safe_engine_replaces_deepspeeds_default_one():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class Engine:
        checkpoint_engine = TorchCheckpointEngine(None)

    engine = Engine()
    engine.checkpoint_engine.zipfile_serialization = True
    use_safe_loads(engine)
    assert type(engine.checkpoint_engine) is SafeCheckpointEngine
    assert engine.checkpoint_engine.zipfile_serialization is True  # saving is unchanged


def test_rng_files_hold_no_numpy_objects_and_old_ones_still_load(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    state = checkpoint._rng_state()
    torch.save(state, tmp_path / "rng_rank00000.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "rng_rank00000.pt") == []
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint._set_rng_state(load_file(tmp_path / "rng_rank00000.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    # an RNG file of an earlier version: NumPy's state tuple with its ndarray
    old = {**state, "numpy": np.random.get_state()}
    torch.save(old, tmp_path / "rng_rank00001.pt")
    expected_np = np.random.rand()
    np.random.seed(1)
    checkpoint._set_rng_state(load_file(tmp_path / "rng_rank00001.pt", extra=NUMPY_ARRAY))
    assert np.random.rand() == expected_np
    with pytest.raises(UnsafeCheckpointError):  # the NumPy allowance is for RNG files only
        load_file(tmp_path / "rng_rank00001.pt")


@pytest.mark.parametrize(
    "content", ["../../elsewhere", "/tmp", "step_00000001/../../x", "step_1\nrm", ""]
)
def test_latest_must_name_a_step_directory_inside_checkpoints(tmp_path, content):
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step_00000001").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (ckpt / "latest").write_text(content)
    with pytest.raises(checkpoint.CheckpointReadError, match="latest"):
        checkpoint.latest_tag(ckpt)
    with pytest.raises(checkpoint.CheckpointReadError):
        checkpoint.resolve_tag(ckpt, "latest")


def test_latest_and_checkpoint_directories_may_not_be_links(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (tmp_path / "outside").mkdir()
    ckpt.mkdir()
    (ckpt / "step_00000002").symlink_to(tmp_path / "outside")
    (ckpt / "latest").write_text("step_00000002")
    with pytest.raises(checkpoint.CheckpointReadError, match="symbolic link"):
        checkpoint.latest_tag(ckpt)
    (ckpt / "latest").unlink()
    (ckpt / "latest").symlink_to(tmp_path / "outside")
    with pytest.raises(checkpoint.CheckpointReadError, match="not a regular file"):
        checkpoint.latest_tag(ckpt)
    for tag in ("../outside", "step_00000002"):
        with pytest.raises(checkpoint.CheckpointReadError):
            checkpoint.resolve_tag(ckpt, tag)


def test_the_latest_pointer_is_never_written_through_a_link(tmp_path):
    """A link planted at ``latest`` is refused; its target is untouched, no temporary is left."""
    from falqon_dist.files import UnsafeFileError

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "latest").symlink_to(victim)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        checkpoint._atomic_write_text(ckpt / "latest", "step_00000003")
    assert victim.read_text() == "precious" and sorted(p.name for p in ckpt.iterdir()) == ["latest"]
    (ckpt / "latest").unlink()
    checkpoint._atomic_write_text(ckpt / "latest", "step_00000003")
    assert (ckpt / "latest").read_text() == "step_00000003" and sorted(
        p.name for p in ckpt.iterdir()
    ) == ["latest"]
