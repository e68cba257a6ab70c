"""A training run's saved ``config.yaml``, read back for work after training (export, eval, restore).

Only coherence is checked here (:func:`~falqon_dist.train.settings.validate`): the training data,
the user's DeepSpeed JSON and the training libraries need not exist any more (that is
:func:`~falqon_dist.train.preflight.preflight`'s job, before training).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from falqon_dist.fp8 import check_backend
from falqon_dist.train.settings import ConfigError, RunSettings, validate

log = logging.getLogger("falqon_dist")

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"


class RestoreError(RuntimeError):
    """A run directory that cannot be used after training; the message names the missing path or bad key."""


def load_run_config(run_dir: str | Path) -> tuple[DictConfig, RunSettings]:
    """``run_dir/config.yaml`` (written by rank 0 at the start of training), loaded and validated."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RestoreError(f"run.dir={str(run_dir)!r}: no such run directory")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RestoreError(f"{path} not found: run.dir must be a training run directory (rank 0 writes {CONFIG_FILE})")
    cfg = OmegaConf.load(path)
    return cfg, validate_saved_config(cfg, str(path))


def validate_saved_config(cfg: DictConfig | dict, where: str) -> RunSettings:
    """Validate a config saved by a training run, for work after training (restore, export, eval).

    Only coherence is checked (:func:`validate`; the training data, the DeepSpeed JSON and the
    training libraries need not exist here: that is :func:`preflight`'s job). ``export.enabled`` is
    switched off (the method check names that problem itself), and ``fp8.backend=te`` becomes
    ``auto`` where Transformer Engine cannot run (the FP8 bytes do not depend on the backend; eval
    runs on the one ``auto`` picks). Raises :class:`RestoreError` naming ``where``.
    """
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    if OmegaConf.select(cfg, "export.enabled"):
        cfg.export.enabled = False
    if OmegaConf.select(cfg, "fp8.backend") == "te":
        try:
            check_backend("te")
        except ImportError:
            log.info("%s: trained with fp8.backend=te, which cannot run here; using fp8.backend=auto", where)
            cfg.fp8.backend = "auto"
    try:
        return validate(cfg)
    except ConfigError as error:
        raise RestoreError(f"{where}: {error}") from None
