"""``export_fp8`` on a ZeRO-3 engine across 2 gloo ranks (bf16): rank 0 alone writes, parameters are
gathered module by module, and the files are bit-identical to a single-process export of the same
weights. The checks run in ``worker_export.py`` (see its docstring)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.launcher import run_ranks

HERE = Path(__file__).parent
CHECKS = ["only-rank0-writes", "module-by-module", "bitwise-single-process", "trains-after-export"]


@pytest.mark.dist
def test_export_fp8_under_zero3(tmp_path):
    output = run_ranks(HERE / "worker_export.py", str(tmp_path))
    for check in CHECKS:
        assert f"CHECK export-zero3 {check} ok" in output, (check, output[-4000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["single", "zero3"]
