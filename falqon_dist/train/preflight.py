"""What a training run needs from this machine and its files, checked before any work starts.

:func:`falqon_dist.train.settings.validate` checks that a config is coherent (types, ranges, which
values go together), which holds wherever the run's ``config.yaml`` is read again: export and eval
of a finished run need no training data, no DeepSpeed JSON, no bitsandbytes. :func:`preflight`
checks the rest, for training only, before the data or the model is loaded:

* the model: ``model.name_or_path`` (a local directory with a ``config.json``) and, for FALQON,
  ``method.rank`` / ``method.topk`` against every layer it will convert (the model is built from its
  config on the meta device: no weight is read);
* the files: ``data.path`` and each ``data.sources[i].path`` (a local file or directory),
  ``deepspeed.config`` (a JSON, merged with the run's settings and validated: see
  :mod:`falqon_dist.train.ds_config`);
* the libraries: the FP8 backend (``fp8.backend=te`` needs Transformer Engine and an FP8 GPU) and
  bitsandbytes for ``method=qlora``.

Every failure is one :class:`ConfigError` naming the key and what would be valid.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from falqon_dist.data.config import LOCAL_ONLY
from falqon_dist.fp8 import check_backend
from falqon_dist.train.ds_config import build_ds_config
from falqon_dist.train.method_group import FP8_METHODS
from falqon_dist.train.settings import ConfigError, RunSettings

#: Suffixes that make a ``data.path`` a local file (alpaca/oasst1 also take a hub dataset name).
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")


def preflight(settings: RunSettings, world_size: int) -> dict[str, Any]:
    """Check the machine and the files for ``settings``; return the run's DeepSpeed config."""
    _check_model_dir(settings.model.name_or_path)
    _check_model_fits(settings)
    _check_data_path(settings.data.name, settings.data.path, "data.path")
    for index, source in enumerate(settings.data.sources):
        _check_data_path(source.format, source.path, f"data.sources[{index}].path")
    config = settings.deepspeed.config
    if config is not None and not config.is_file():
        raise ConfigError(f"deepspeed.config={str(config)!r}: no such file (a DeepSpeed JSON)")
    if settings.method.name in FP8_METHODS:
        try:
            check_backend(settings.fp8.backend)  # te: an FP8 GPU and Transformer Engine, else say what to use
        except ImportError as error:
            raise ConfigError(str(error)) from None
    if settings.uses_tensorboard:
        from falqon_dist.train.tensorboard_logger import check_tensorboard

        try:
            check_tensorboard()
        except ImportError as error:
            raise ConfigError(str(error)) from None
    if settings.method.name == "qlora":
        from falqon_dist.baselines.qlora import import_bitsandbytes

        try:
            import_bitsandbytes()
        except ImportError as error:
            raise ConfigError(str(error)) from None
    return build_ds_config(settings, world_size)


#: ``model.max_length=null`` with ``model.name_or_path``: the model's own context, at most this many
#: tokens (a row's cost grows with its length; set model.max_length for longer rows).
CONTEXT_CAP = 2048
#: ``model.max_length=null`` for the embedded tiny model (its pretraining sequence length).
EMBEDDED_MAX_LENGTH = 128


def resolve_model_context(settings: RunSettings, cfg: DictConfig) -> RunSettings:
    """``model.max_length=null`` made concrete from the model's ``config.json``
    (``max_position_embeddings``, capped at :data:`CONTEXT_CAP`; the embedded model:
    :data:`EMBEDDED_MAX_LENGTH`), and the preset name ``tiny`` replaced by the model actually given in
    ``model.name_or_path``. Written into ``cfg`` too, so the run's config.yaml (and a resume's
    comparison) records what the run uses. Call after :func:`preflight` (the model directory exists)."""
    model = settings.model
    length, name = model.max_length, model.name
    if length is None:
        if model.name_or_path is None:
            length = EMBEDDED_MAX_LENGTH
        else:
            config = _model_config(model.name_or_path)
            context = getattr(config, "max_position_embeddings", None) if config is not None else None
            if not isinstance(context, int) or context < 8:
                raise ConfigError(
                    f"model.max_length=null takes the model's own context, but {model.name_or_path!r} gives none "
                    "here (no max_position_embeddings in a locally readable config.json); set model.max_length=N"
                )
            length = min(context, CONTEXT_CAP)
        cfg.model.max_length = length
    if model.name_or_path is not None and name == "tiny":  # the embedded model's preset, with another model
        name = Path(model.name_or_path).expanduser().name if _is_local(model.name_or_path) else model.name_or_path
        cfg.model.name = name
    data = settings.data if settings.data.max_length is not None else dataclasses.replace(settings.data, max_length=length)
    return dataclasses.replace(settings, model=dataclasses.replace(model, max_length=length, name=name), data=data)


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).exists()


def _check_model_dir(path: str | None) -> None:
    if path is None or not _is_local(path):
        return
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"model.name_or_path={path!r}: no such model directory")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"model.name_or_path={path!r}: no config.json there (a Hugging Face model directory)")


def _check_model_fits(settings: RunSettings) -> None:
    """``method.target_modules`` / ``exclude_modules`` against the model's layers, and FALQON's rank
    and topk against every layer it will convert (as ``convert_model`` checks them after the load),
    from the model's config alone."""
    method = settings.method
    if method.name == "full":
        return
    config = _model_config(settings.model.name_or_path)
    if config is None:  # a hub name not in the local cache: checked at conversion
        return
    import torch
    from transformers import AutoModelForCausalLM

    from falqon_dist.method.convert import check_convertible
    from falqon_dist.method.swap import select_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        chosen = select_modules(model, method.target_modules, method.exclude_modules)
    except ValueError as error:
        raise ConfigError(f"method.{error}") from None
    if method.name != "falqon":
        return
    try:
        names = check_convertible(model, settings.method.config, module_filter_fn=chosen)
    except ValueError as error:
        key = "method.topk" if "topk" in str(error) else "method.rank"
        raise ConfigError(f"{key}={getattr(settings.method.config, key.split('.')[1])}: {error}") from None
    if not names:
        model_name = settings.model.name_or_path or "the embedded tiny model"
        raise ConfigError(f"method=falqon: {model_name} has no nn.Linear besides lm_head whose dimensions are "
                          "multiples of 16: nothing to convert")  # fmt: skip


def _model_config(name_or_path: str | None):
    """The model's transformers config, read locally (None where only the hub has it)."""
    if name_or_path is None:
        from falqon_dist.models import tiny_config

        return tiny_config()
    from transformers import AutoConfig

    local = _is_local(name_or_path)
    try:
        return AutoConfig.from_pretrained(str(Path(name_or_path).expanduser()) if local else name_or_path,
                                          local_files_only=True)  # fmt: skip
    except (OSError, ValueError, TypeError) as error:  # TypeError: a field of the wrong type
        if local:
            raise ConfigError(f"model.name_or_path={name_or_path!r}: its config.json cannot be read ({error})") from None
        return None


def _check_data_path(name: str, path: str | tuple[str, ...] | None, key: str) -> None:
    for one in path if isinstance(path, tuple) else (path,):
        if one is None or Path(one).expanduser().exists():
            continue
        if name in LOCAL_ONLY or one.startswith((".", "/", "~")) or one.endswith(LOCAL_SUFFIXES):
            shown = f"{key}={one!r}" if one == path else f"{key}: {one!r}"
            raise ConfigError(f"{shown}: no such file or directory")
