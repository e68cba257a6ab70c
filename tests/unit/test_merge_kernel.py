"""The Triton every-row merge kernel, checked on CPU under Triton's interpreter against the torch tiles
(bytes and counts equal, both roundings, NaN / saturating / empty rows, ZeRO-3-style slices, every
E4M3 midpoint), and the kernel selection's errors. The GPU tier runs the same comparison compiled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from falqon_dist.method import every_row, merge_kernel

WORKER = Path(__file__).with_name("interpreted_merge_kernel.py")


def test_the_kernel_under_the_interpreter_writes_the_reference_bytes_counts_and_carry():
    pytest.importorskip("triton", reason="the kernel check needs the triton package (dev extra)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(WORKER)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK: 36 cases"), done.stdout


def test_the_merge_kernel_choice_is_checked():
    with pytest.raises(ValueError, match="auto"):
        every_row.set_merge_kernel("cuda")
    every_row.set_merge_kernel("auto")  # CPU tensors take the torch tiles under auto


def test_requiring_the_kernel_without_triton_names_the_package(monkeypatch):
    monkeypatch.setattr(merge_kernel, "triton", None)
    assert not merge_kernel.available()
    with pytest.raises(RuntimeError, match="pip install triton"):
        merge_kernel.require()
