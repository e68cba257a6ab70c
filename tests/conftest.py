"""Shared test configuration: deterministic seeds, CPU-friendly threads, the test tiers.

Every test carries the marker of its directory (registered in pyproject.toml): ``unit``
(tests/unit, in-process), ``dist`` (tests/distributed, 2 gloo ranks), ``e2e`` (tests/e2e, the real
launchers) or ``gpu`` (tests/gpu, skipped without CUDA). ``slow`` is added to every dist and e2e
test and to the unit tests in :data:`SLOW_UNIT_TESTS`, so ``-m "unit and not slow"`` (``make
test-fast``) is the quick tier and ``make test`` runs everything.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).resolve().parent

#: Directory under tests/ -> the tier marker its tests get.
TIERS = {"unit": "unit", "distributed": "dist", "e2e": "e2e", "gpu": "gpu"}

#: Tiers whose every test is slow: each one starts processes and a training run.
SLOW_TIERS = frozenset({"dist", "e2e"})

#: Unit tests over about 2.5 s on 2 CPU cores (``pytest tests/unit --durations=0``), as
#: ``file::function`` under tests/unit (every parametrization): torch.compile, the Triton
#: interpreter, trainer runs, subprocess ranks, 7B-sized layers. A name that no longer exists in
#: its file is a collection error, so the list cannot silently go stale.
SLOW_UNIT_TESTS = frozenset(
    {
        "test_baselines.py::test_fp8_lora_matches_float_reference_sqnr",
        "test_baselines.py::test_fp8_lora_scale_survives_module_casts",
        "test_benchmarks.py::test_layer_bench_measures_every_method",
        "test_benchmarks.py::test_learning_bench_sweeps_variants_through_the_trainer",
        "test_benchmarks.py::test_merge_bench_compares_the_implementations_and_counts_their_traffic",
        "test_benchmarks.py::test_model_bench_reads_the_trainers_own_metrics",
        "test_cast.py::test_compiled_cast_is_bit_identical_to_eager",
        "test_cast.py::test_many_input_variants_stay_bit_identical_beyond_the_recompile_limit",
        "test_cast.py::test_scale_epilogue_matches_eager",
        "test_convert.py::test_adamw_with_merges_trains_a_converted_llama",
        "test_data_mixing.py::test_every_process_builds_the_same_mixture",
        "test_falqon_linear.py::test_merge_counts_saturation",
        "test_merge.py::test_all_rows_slice_merge_equals_the_whole_merge_for_any_partitioning",
        "test_merge.py::test_merging_a_7b_mlp_layer_never_builds_a_temporary_over_16_mib",
        "test_merge.py::test_slice_merge_equals_whole_tensor_merge_for_any_partitioning",
        "test_merge.py::test_the_tiled_every_row_merge_gives_the_untiled_bytes_carry_and_counts",
        "test_merge_kernel.py::test_the_kernel_under_the_interpreter_writes_the_reference_bytes_counts_and_carry",
        "test_safe_files.py::test_the_busy_probe_sees_another_process_and_creates_no_lock",
        "test_tiny_model.py::test_the_pretraining_recipe_still_runs_and_learns",
        "test_waits.py::test_rendezvous_names_the_rank_that_never_joins",
        "test_waits.py::test_rendezvous_of_all_ranks_completes",
        "test_waits.py::test_rendezvous_without_rank_0_says_the_host_did_not_answer",
    }
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _stale_slow_entries() -> list[str]:
    """The entries of :data:`SLOW_UNIT_TESTS` whose file has no function of that name."""
    stale = []
    for entry in sorted(SLOW_UNIT_TESTS):
        file, _, name = entry.partition("::")
        path = TESTS / "unit" / file
        text = path.read_text() if path.is_file() else ""
        if not re.search(rf"^\s*(async\s+)?def {re.escape(name.split('::')[-1])}\(", text, re.M):
            stale.append(entry)
    return stale


def _test_name(item: pytest.Item) -> str:
    """``file::function`` of ``item``, without the parametrization (``[...]``)."""
    return f"{item.path.name}::{item.nodeid.split('::', 1)[1].split('[')[0]}"


def _tier(item: pytest.Item) -> str | None:
    try:
        directory = item.path.resolve().relative_to(TESTS).parts[0]
    except ValueError:  # a test outside tests/ (a path given on the command line)
        return None
    return TIERS.get(directory)


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the markers must be on the items by then
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    stale = _stale_slow_entries()
    if stale:
        raise pytest.UsageError(
            f"tests/conftest.py SLOW_UNIT_TESTS names tests that no longer exist: {stale}; "
            "update the list"
        )
    skip_gpu = pytest.mark.skip(
        reason="needs a CUDA GPU (run launch/gpu_check.sh on a GPU machine)"
    )
    cuda = torch.cuda.is_available()
    for item in items:
        tier = _tier(item)
        if tier is not None:
            item.add_marker(tier)
        if tier in SLOW_TIERS or (tier == "unit" and _test_name(item) in SLOW_UNIT_TESTS):
            item.add_marker(pytest.mark.slow)
        if not cuda and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
