"""FalqonCallback inside transformers.Trainer with DeepSpeed ZeRO-2 and ZeRO-3 on 2 gloo ranks
(the checks run in ``worker_hf_trainer.py``, see its docstring)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.distributed.launcher import run_ranks

HERE = Path(__file__).parent
CHECKS = ["merged", "same-on-every-rank", "master-reset", "exported"]


@pytest.mark.dist
@pytest.mark.parametrize("stage", [2, 3])
def test_falqon_callback_in_the_hf_trainer_with_deepspeed(stage, tmp_path):
    output = run_ranks(HERE / "worker_hf_trainer.py", str(stage), str(tmp_path))
    for check in CHECKS:
        assert f"CHECK hf-trainer {check} ok" in output, (check, output[-4000:])
    changed = set(
        re.findall(r"CHECK hf-trainer merged ok \(rank \d: (\d+) bytes changed\)", output)
    )
    assert len(changed) == 1, changed  # both ranks hold the same backbone
