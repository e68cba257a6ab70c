"""Checkpoint round trip on 2 gloo ranks: a resumed run continues exactly like an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.launcher import run_ranks

HERE = Path(__file__).parent


@pytest.mark.dist
@pytest.mark.parametrize("stage", [1, 3])
def test_checkpoint_round_trip(stage, tmp_path):
    output = run_ranks(HERE / "worker_checkpoint.py", str(stage), str(tmp_path / "ckpt"))
    assert f"CHECK stage{stage} checkpoint-round-trip ok" in output, output[-4000:]
    assert f"CHECK stage{stage} checkpoint-rank0-decides ok" in output, output[-4000:]
