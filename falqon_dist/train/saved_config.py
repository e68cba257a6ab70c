"""A training run's saved ``config.yaml``, read back for work after training (export, eval, restore).

Only coherence is checked here (:func:`~falqon_dist.train.settings.validate`): the training data,
the user's DeepSpeed JSON and the training libraries need not exist any more (that is
:func:`~falqon_dist.train.preflight.preflight`'s job, before training).
Keys an older version wrote are read as today's (a moved key under its new name, FALQON's
``method.topk`` / ``unmerged`` / ``carry_residual`` as the ``method.merge`` recipe they meant, a merge
no longer offered refused naming the file and the key: :mod:`falqon_dist.train.config_migrations`).

**A saved config never resolves the reader's environment.** Every read-back of one (a run's
``config.yaml``, the ``config`` object of an export's ``falqon_run.json``) goes through
:func:`read_saved_config`, which loads it without running any resolver and refuses any string that
still holds ``${`` (the rule and its reasons: :mod:`falqon_dist.export.read_back`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from falqon_dist.export.read_back import RestoreError, check_no_interpolation
from falqon_dist.fp8 import check_backend
from falqon_dist.train.settings import ConfigError, RunSettings, validate

log = logging.getLogger("falqon_dist")

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"

__all__ = [
    "CHECKPOINTS",
    "CONFIG_FILE",
    "RestoreError",
    "check_no_interpolation",
    "load_run_config",
    "read_saved_config",
    "validate_saved_config",
]


def load_run_config(run_dir: str | Path) -> tuple[DictConfig, RunSettings]:
    """``run_dir/config.yaml`` (written by rank 0 at the start of training), loaded and validated."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RestoreError(f"run.dir={str(run_dir)!r}: no such run directory")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RestoreError(
            f"{path} not found: run.dir must be a training run directory (rank 0 writes {CONFIG_FILE})"
        )
    cfg = read_saved_config(path)
    return cfg, validate_saved_config(cfg, str(path))


def read_saved_config(
    source: str | Path | Mapping[str, Any], where: str | None = None
) -> DictConfig:
    """A saved run config, loaded without any resolver: the one way a saved config is read back.

    ``source`` is a ``config.yaml`` path, or the already-parsed ``config`` object of a
    ``falqon_run.json`` (then ``where`` names it in errors; for a path, ``where`` defaults to the
    path). The YAML (or object) is turned into plain containers with ``resolve=False`` and every
    string is checked before the tree becomes a config anything could resolve: one holding ``${``
    is a :class:`RestoreError` naming the file and the dotted key. So are a file that is missing,
    not YAML, or not a mapping. The returned config holds no interpolation at all.
    """
    if isinstance(source, Mapping):
        where = where or "saved config"
        tree: Any = (
            OmegaConf.to_container(source, resolve=False)
            if isinstance(source, DictConfig)
            else source
        )
    else:
        path = Path(source)
        where = where or str(path)
        if not path.is_file():
            raise RestoreError(f"{where}: no such file (a training run's {CONFIG_FILE})")
        try:
            # parses only: interpolations are resolved on access, never here
            loaded = OmegaConf.load(path)
        except Exception as error:  # noqa: BLE001 - yaml's and OmegaConf's parse errors have no common base
            raise RestoreError(
                f"{where}: not a readable YAML config ({type(error).__name__}: {error})"
            ) from None
        if not isinstance(loaded, DictConfig):
            raise RestoreError(
                f"{where}: expected a mapping of config groups (a training run's {CONFIG_FILE})"
            )
        tree = OmegaConf.to_container(loaded, resolve=False)
    if not isinstance(tree, Mapping):
        raise RestoreError(
            f"{where}: expected a mapping of config groups, got {type(tree).__name__}"
        )
    check_no_interpolation(tree, where)
    return OmegaConf.create(dict(tree))


def validate_saved_config(cfg: DictConfig | dict, where: str) -> RunSettings:
    """Validate a config saved by a training run, for work after training (restore, export, eval).

    Only coherence is checked (:func:`validate`; the training data, the DeepSpeed JSON and the
    training libraries need not exist here: that is :func:`preflight`'s job). ``export.enabled`` is
    switched off (the method check names that problem itself), and ``fp8.backend=te`` becomes
    ``auto`` where Transformer Engine cannot run (the FP8 bytes do not depend on the backend; eval
    runs on the one ``auto`` picks). Raises :class:`RestoreError` naming ``where``, also for a
    string holding an interpolation (:func:`check_no_interpolation`: checked before anything resolves
    ``cfg``; read saved configs with :func:`read_saved_config`).
    """
    check_no_interpolation(cfg, where)
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    if OmegaConf.select(cfg, "export.enabled"):
        cfg.export.enabled = False
    if OmegaConf.select(cfg, "fp8.backend") == "te":
        try:
            check_backend("te")
        except ImportError:
            log.info(
                "%s: trained with fp8.backend=te, which cannot run here; using fp8.backend=auto",
                where,
            )
            cfg.fp8.backend = "auto"
    try:
        return validate(cfg)
    except ConfigError as error:
        raise RestoreError(f"{where}: {error}") from None
