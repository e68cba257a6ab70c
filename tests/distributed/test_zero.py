"""FALQON under DeepSpeed ZeRO 0–3 on 2 gloo ranks (bf16 off and on, grad accumulation, clipping).

Each stage runs ``worker_zero.py`` once; the worker drives DeepSpeed's own engine and FALQON's
post-optimizer hook as the trainer does, and checks, for bf16 off and on: merges only at
accumulation boundaries, bit-identical backbone bytes across ranks (sha256 digest all-gathered),
the fp32 master copy of B zeroed, scales float32 and unchanged, partition sizes (ZeRO-3), and that the
distributed merge writes exactly the bytes of a single-process merge for the same B, for every merge
recipe: ``paper`` and ``topk_keep`` with nearest and with stochastic rounding (the noise is a pure
function of the element index, each ZeRO-3 rank uses its slice; the fp32 master then holds exactly
the unmerged rows), ``topk_carry`` (the carried merged rows equal the single-process merge's) and
``every_row`` (every row; under ZeRO-3 nothing of W gathered, the carry summed over the slices);
and that nothing non-finite reaches the backbone: a NaN loss, and NaN/inf in B's master at a merge
(those rows keep their bytes, counted, the master zeroed there).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.launcher import run_ranks

HERE = Path(__file__).parent
CHECKS = [
    "accumulation-boundaries",
    "replica-identity",
    "master-zeroed",
    "paper-merge-bytes-match-reference",
    "stochastic-paper-merge-bytes-match-reference",
    "topk_keep-merge-bytes-match-reference",
    "stochastic-topk_keep-merge-bytes-match-reference",
    "topk_carry-merge-bytes-match-reference",
    "every_row-merge-bytes-match-reference",
    "nonfinite-never-reaches-the-backbone",
]


@pytest.mark.dist
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_falqon_under_zero_stage(stage):
    output = run_ranks(HERE / "worker_zero.py", str(stage))
    expected = CHECKS + (["partition-sizes"] if stage == 3 else [])
    for bf16 in (False, True):
        for check in expected:
            assert f"CHECK stage{stage}-bf16={bf16} {check} ok" in output, (check, output[-4000:])


@pytest.mark.dist
def test_zero3_loading_converts_layer_by_layer(tmp_path):
    output = run_ranks(HERE / "worker_zero_init.py", str(tmp_path / "model"))
    for check in ("partitioned-after-conversion", "bytes-match-single-process", "trains"):
        assert f"CHECK zero-init {check} ok" in output, (check, output[-4000:])
