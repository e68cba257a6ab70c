#!/usr/bin/env python
"""Hydra entry point of falqon_dist training.

    python launch/train.py [key=value ...]
    deepspeed --num_gpus N launch/train.py [key=value ...]        (with or without --no_local_rank)
    torchrun --nproc_per_node N launch/train.py [key=value ...]
    deepspeed --hostfile launch/hostfile.example launch/train.py ...   (see launch/multinode.sh)

Overrides are validated before any work starts; see conf/config.yaml for every field.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from falqon_dist.distributed.build_locks import StaleLockError  # noqa: E402
from falqon_dist.distributed.rendezvous import RendezvousError  # noqa: E402
from falqon_dist.train.bootstrap import (  # noqa: E402
    agree_run_dir,
    init_process_group,
    move_overrides,
    requested_override,
    strip_local_rank,
    timeout_from_overrides,
)


@hydra.main(config_path=str(REPO / "conf"), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from falqon_dist.train.trainer import run

    run(cfg)


def start(argv: list[str]) -> str:
    """Process group and run directory, before Hydra composes the config; returns the run directory."""
    init_process_group(timeout_from_overrides(argv))
    return agree_run_dir(requested_override(argv, "run.dir"))


if __name__ == "__main__":
    argv = move_overrides(strip_local_rank(sys.argv[1:]))
    try:
        run_dir = start(argv)
    except (RendezvousError, StaleLockError) as exc:
        # one line, no traceback: the message says it all
        print(f"falqon_dist: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    overrides = [a for a in argv if not a.lstrip("+~").startswith("run.dir=")]
    sys.argv = [
        sys.argv[0],
        *overrides,
        f"run.dir={run_dir}",
        # Hydra must not write per-rank files or logs: rank 0 writes the resolved config and train.log.
        f"hydra.run.dir={run_dir}",
        "hydra.output_subdir=null",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
    ]
    existed = os.path.exists(run_dir)
    try:
        main()
    finally:
        # Hydra creates hydra.run.dir even for a run refused before any work: leave no trace
        if not existed:
            with contextlib.suppress(OSError):
                os.rmdir(run_dir)  # only ever removes an empty directory
