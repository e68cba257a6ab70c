"""DeepSpeed's CPU shm segments: each rank unlinks its own once all have mapped them, nothing stays in
/dev/shm, and the shm all-reduce still works afterwards."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.distributed.launcher import run_ranks

HERE = Path(__file__).parent


@pytest.mark.dist
def test_deepspeed_launcher_run_leaves_no_shared_memory_behind():
    output = run_ranks(HERE / "worker_shm.py", launcher="deepspeed")
    segments = dict(re.findall(r"CHECK rank(\d) segment (\S+) mapped-and-unlinked=True", output))
    assert sorted(segments) == ["0", "1"], output[-4000:]
    for rank in ("0", "1"):
        assert f"CHECK rank{rank} remaining []" in output, output[-4000:]
        assert re.search(rf"CHECK rank{rank} shm-op=\w+ all-reduce ok", output), output[-4000:]
    assert "shm-op=True" in output, "DeepSpeed's shm op did not load: the test would prove nothing"
    assert not any(Path(path).exists() for path in segments.values())
