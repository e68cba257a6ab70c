"""The trainer's step back-propagates the token-weighted loss of the whole step (train/loss.py):
the same global batch of 4 examples with responses of different lengths gives the same gradient in
every micro-batch layout, 1 x 4, 2 x 2 and 4 x 1 (micro-batch x accumulation) on 1 rank and 2 x 1,
1 x 2 on 2 gloo ranks, equal to plain torch's gradient of Σ token losses / their count, for LoRA
(peft; ZeRO 0, 2, 3) and FALQON's B (ZeRO 0, 2), within ‖g − ref‖₂ / ‖ref‖₂ <= 1e-5 (float32).
``worker_token_loss.py`` says what each check compares and why FALQON's own FP8 casts make it
layout-dependent (so its layout-free check takes power-of-two cast scales).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.launcher import run_ranks

HERE = Path(__file__).parent
STAGES = "0,2,3"


def expected_checks(layouts: list[tuple[int, int]]) -> list[str]:
    """Every ``CHECK`` line the worker prints for these layouts (see its main)."""
    checks = []
    for name in ("same-length", "padded"):
        for method in ("lora", "falqon") + (("falqon-pow2",) if name == "same-length" else ()):
            for micro, accum in layouts:
                for stage in (0, 2, 3) if method == "lora" else (0, 2):
                    tag = f"{name}-{method}-zero{stage}-{micro}x{accum}"
                    checks.append(f"{tag} matches-partition-reference")
                    if method == "lora" or method == "falqon-pow2":
                        checks.append(f"{tag} matches-global-reference")
                    if micro < 4:
                        checks.append(f"{tag} old-normalization-fails")
                    checks.append(f"{tag} record-loss")
    return checks


@pytest.mark.dist
@pytest.mark.parametrize(("nproc", "layouts"), [(1, [(1, 4), (2, 2), (4, 1)]), (2, [(2, 1), (1, 2)])],
                         ids=["1-rank", "2-ranks"])  # fmt: skip
def test_the_step_gradient_is_the_token_weighted_one_in_every_layout(nproc, layouts):
    spec = ",".join(f"{micro}x{accum}" for micro, accum in layouts)
    output = run_ranks(HERE / "worker_token_loss.py", spec, STAGES, nproc=nproc)
    missing = [check for check in expected_checks(layouts) if f"CHECK {check} ok" not in output]
    assert not missing, (missing[:5], output[-4000:])
