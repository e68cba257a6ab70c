"""The DeepSpeed internals falqon_dist relies on are still there (pyproject pins the tested range).

The trainer runs FALQON's post-optimizer hook when ``DeepSpeedEngine.global_steps`` advances across
``engine.step()``, and ``falqon_dist.distributed`` finds B's fp32 master copy through names DeepSpeed
does not document: the stage-0
``FP16_Optimizer.fp32_groups_flat`` / ``FP16_UnfusedOptimizer.fp32_groups``, ZeRO-1/2's
``_hp_mapping`` fragments and ZeRO-3's ``ds_tensor`` / ``ds_numel`` / ``ds_process_group`` /
``ds_persist`` partition attributes, and reads checkpoints through the engine's pluggable
``checkpoint_engine``. A DeepSpeed release that renames one fails here, by name,
instead of deep inside a merge.
"""

from __future__ import annotations

import inspect
from importlib import metadata

import pytest
from packaging.version import Version

deepspeed = pytest.importorskip("deepspeed")


def _source(obj) -> str:
    return inspect.getsource(obj)


def test_the_installed_deepspeed_is_in_the_tested_range():
    from packaging.requirements import Requirement

    requirement = next(
        Requirement(r) for r in metadata.requires("falqon_dist") if r.startswith("deepspeed")
    )
    assert Version(deepspeed.__version__) in requirement.specifier, (
        deepspeed.__version__,
        str(requirement),
    )


def test_the_engine_counts_optimizer_steps_where_the_trainer_reads_them():
    """``global_steps`` advances in the engine's optimizer step, which ``step()`` takes only at a
    gradient-accumulation boundary: the trainer merges exactly when it advanced."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert "self.global_steps += 1" in _source(DeepSpeedEngine._take_model_step)
    assert "self._take_model_step(" in _source(DeepSpeedEngine.step)
    assert "is_gradient_accumulation_boundary()" in _source(DeepSpeedEngine.step)


def test_master_copy_accessors_exist():
    from deepspeed import utils

    for name in (
        "safe_get_full_fp32_param",
        "safe_set_full_fp32_param",
        "safe_get_local_fp32_param",
        "safe_set_local_fp32_param",
    ):
        assert callable(getattr(utils, name)), name


def test_stage0_optimizers_keep_their_fp32_groups_under_these_names():
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    assert "self.fp32_groups_flat" in _source(FP16_Optimizer) and "self.fp16_groups" in _source(
        FP16_Optimizer
    )
    assert "self.fp32_groups" in _source(FP16_UnfusedOptimizer) and "self.fp16_groups" in _source(
        FP16_UnfusedOptimizer
    )


def test_zero_partition_attributes_exist():
    from deepspeed.runtime.zero import partition_parameters
    from deepspeed.utils import mixed_precision_linkage

    source = _source(partition_parameters)
    for name in ("ds_tensor", "ds_numel", "ds_process_group", "ds_persist", "ds_shape", "ds_id"):
        assert f".{name}" in source, name
    assert "_hp_mapping" in _source(mixed_precision_linkage)


def test_checkpoint_reads_go_through_the_engines_pluggable_checkpoint_engine():
    """``safe_load.use_safe_loads`` replaces ``engine.checkpoint_engine``: DeepSpeed must still build a
    ``TorchCheckpointEngine`` there by default and read model and ZeRO optimizer states through its
    ``load(path, map_location=…)``."""
    from deepspeed.runtime.checkpoint_engine import utils as engine_utils
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert "return TorchCheckpointEngine(config_params)" in _source(
        engine_utils.create_checkpoint_engine
    )
    assert list(inspect.signature(TorchCheckpointEngine.load).parameters) == [
        "self",
        "path",
        "map_location",
    ]
    assert "zipfile_serialization" in _source(TorchCheckpointEngine)
    for reader in ("_load_checkpoint", "_get_all_zero_checkpoint_state_dicts"):
        assert "self.checkpoint_engine.load(" in _source(getattr(DeepSpeedEngine, reader)), reader
