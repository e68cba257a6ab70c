#!/usr/bin/env python
"""Step time of two (or more) trainer configurations, paired: their steps alternate in ONE process.

    python benchmarks/paired_steps.py SPEC.json OUT.json

``SPEC.json``: ``{"variants": {name: [Hydra overrides]}, "steps": N, "warmup": W}``. Each variant is
a real :class:`~falqon_dist.train.trainer.Trainer` (the same ``setup()`` and ``train_step()`` as
``launch/train.py``, each in the run directory its overrides name), all built in this process; after
``W`` warm-up steps each, step ``i`` of every variant runs back to back, the order reversed on odd
``i`` (A B, B A, ...). A shared or virtual machine's speed drifts by tens of percent over seconds
(other tenants, frequency changes); two steps taken a fraction of a second apart see the same
machine, so the ratio of the paired steps' times cancels that drift, which separate runs, even
interleaved, do not. ``OUT.json``: ``{"step_time_s": {name: [N times]}}``, in pair order.

Run by ``bench_learning.py`` (``--time-rounds``); one rank, every core.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def paired_step_times(
    variants: dict[str, list[str]], steps: int, warmup: int
) -> dict[str, list[float]]:
    """Build one trainer per variant, then time ``steps`` alternating steps of each (see module doc)."""
    from hydra import compose, initialize_config_dir

    from falqon_dist.train.trainer import Trainer

    trainers = {}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for name, overrides in variants.items():
            trainer = Trainer(compose("config", overrides=overrides))
            trainer.setup()
            trainers[name] = trainer
    try:
        for _ in range(warmup):
            for trainer in trainers.values():
                trainer.train_step()
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for i in range(steps):
            order = list(trainers) if i % 2 == 0 else list(reversed(trainers))
            for name in order:
                times[name].append(trainers[name].train_step()["step_time_s"])
        return times
    finally:
        for trainer in trainers.values():
            trainer.cleanup()


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    spec = json.loads(Path(argv[0]).read_text())
    from falqon_dist.train.bootstrap import init_process_group

    init_process_group(600.0)
    times = paired_step_times(spec["variants"], int(spec["steps"]), int(spec.get("warmup", 3)))
    Path(argv[1]).write_text(json.dumps({"step_time_s": times}))


if __name__ == "__main__":
    main(sys.argv[1:])
