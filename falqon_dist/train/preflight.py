"""What a training run needs from this machine and its files, checked before any work starts.

:func:`falqon_dist.train.settings.validate` checks that a config is coherent (types, ranges, which
values go together), which holds wherever the run's ``config.yaml`` is read again: export and eval
of a finished run need no training data, no DeepSpeed JSON, no bitsandbytes. :func:`preflight`
checks the rest, for training only, before the data or the model is loaded:

* the files: ``model.name_or_path`` (a local directory), ``data.path`` (a local file or directory),
  ``deepspeed.config`` (a JSON, merged with the run's settings and validated: see
  :mod:`falqon_dist.train.ds_config`);
* the libraries: the FP8 backend (``fp8.backend=te`` needs Transformer Engine and an FP8 GPU) and
  bitsandbytes for ``method=qlora``.

Every failure is one :class:`ConfigError` naming the key and what would be valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from falqon_dist.fp8 import check_backend
from falqon_dist.train.ds_config import build_ds_config
from falqon_dist.train.settings import FP8_METHODS, ConfigError, RunSettings

#: Suffixes that make a ``data.path`` a local file (alpaca/oasst1 also take a hub dataset name).
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


def preflight(settings: RunSettings, world_size: int) -> dict[str, Any]:
    """Check the machine and the files for ``settings``; return the run's DeepSpeed config."""
    _check_model_dir(settings.model.name_or_path)
    _check_data_path(settings.data.name, settings.data.path)
    config = settings.deepspeed.config
    if config is not None and not config.is_file():
        raise ConfigError(f"deepspeed.config={str(config)!r}: no such file (a DeepSpeed JSON)")
    if settings.method.name in FP8_METHODS:
        try:
            check_backend(settings.fp8.backend)  # te: an FP8 GPU and Transformer Engine, else say what to use
        except ImportError as error:
            raise ConfigError(str(error)) from None
    if settings.method.name == "qlora":
        from falqon_dist.baselines.qlora import import_bitsandbytes

        try:
            import_bitsandbytes()
        except ImportError as error:
            raise ConfigError(str(error)) from None
    return build_ds_config(settings, world_size)


def _check_model_dir(path: str | None) -> None:
    if path is not None and (path.startswith((".", "/", "~")) or Path(path).exists()):
        if not Path(path).expanduser().is_dir():
            raise ConfigError(f"model.name_or_path={path!r}: no such model directory")


def _check_data_path(name: str, path: str | None) -> None:
    if path is None or Path(path).expanduser().exists():
        return
    if name == "jsonl" or path.startswith((".", "/", "~")) or path.endswith(LOCAL_SUFFIXES):
        raise ConfigError(f"data.path={path!r}: no such file or directory")
