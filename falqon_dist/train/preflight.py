"""What a training run needs from this machine and its files, checked before any work starts.

:func:`falqon_dist.train.settings.validate` checks that a config is coherent (types, ranges, which
values go together), which holds wherever the run's ``config.yaml`` is read again: export and eval
of a finished run need no training data, no DeepSpeed JSON, no bitsandbytes. :func:`preflight`
checks the rest, for training only, before the data or the model is loaded:

* the model: ``model.name_or_path`` is a local directory with a ``config.json``, or a hub id in the
  local Hugging Face cache or reachable (:func:`check_model_source`; which of the two a name is:
  :mod:`falqon_dist.hub_names`); a model that needs its own Python code is refused unless
  ``model.trust_remote_code=true``; and, for FALQON, ``method.rank`` / ``method.topk`` against every
  layer it will convert (the model is built from its config on the meta device: no weight is read);
* the files: ``data.path`` and each ``data.sources[i].path`` (a local file or directory, or for
  alpaca / oasst1 a hub dataset id: a local-looking name that does not exist is never sent to the hub),
  ``deepspeed.config`` (a JSON, merged with the run's settings and validated: see
  :func:`run_ds_config`);
* the run directory, first and on rank 0 (every rank gets the verdict): a live run holding it, a
  symbolic link at a file name a run writes, a fresh run into a directory holding a run (refused
  unless ``run.overwrite=true``, which moves the old run aside: :mod:`falqon_dist.train.run_dir`);
* the libraries: the FP8 backend (``fp8.backend=te`` needs Transformer Engine and an FP8 GPU) and
  bitsandbytes for ``method=qlora``.

Every failure is one :class:`ConfigError` naming the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from falqon_dist.config_checks import InvalidField
from falqon_dist.data.config import LOCAL_ONLY
from falqon_dist.data.sources import is_hub_dataset
from falqon_dist.distributed.config import DeepSpeedConfigError, build_ds_config
from falqon_dist.fp8 import check_backend
from falqon_dist.hub_names import hub_id_problem, hub_offline, is_local, local_reason
from falqon_dist.train.method_group import FP8_METHODS
from falqon_dist.train.run_dir import check_run_dir_use
from falqon_dist.train.settings import ConfigError, RunSettings

#: Suffixes that make a ``data.path`` a local file (alpaca/oasst1 also take a hub dataset name).
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")


def preflight(settings: RunSettings, world_size: int) -> dict[str, Any]:
    """Check the machine and the files for ``settings``; return the run's DeepSpeed config."""
    check_run_dir_use(
        settings.run_dir, resume=settings.train.resume, overwrite=settings.run_overwrite
    )
    check_model_source(settings.model.name_or_path)
    _check_model_fits(settings)
    _check_data_path(settings.data.name, settings.data.path, "data.path")
    for index, source in enumerate(settings.data.sources):
        _check_data_path(source.format, source.path, f"data.sources[{index}].path")
    config = settings.deepspeed.config
    if config is not None and not config.is_file():
        raise ConfigError(f"deepspeed.config={str(config)!r}: no such file (a DeepSpeed JSON)")
    if settings.method.name in FP8_METHODS:
        try:
            # te: an FP8 GPU and Transformer Engine, else say what to use
            check_backend(settings.fp8.backend)
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
    return run_ds_config(settings, world_size)


def run_ds_config(settings: RunSettings, world_size: int) -> dict[str, Any]:
    """The run's DeepSpeed config (:func:`falqon_dist.distributed.config.build_ds_config`: the user's
    JSON with the run's batch sizes, precision, ZeRO stage and optimizer on top); a JSON that
    contradicts the run is one :class:`ConfigError` naming the file and the key."""
    train = settings.train
    try:
        return build_ds_config(
            settings.deepspeed,
            micro_batch_size=train.micro_batch_size,
            grad_accum=train.grad_accum,
            world_size=world_size,
            lr=train.lr,
            weight_decay=train.weight_decay,
            bf16=settings.model.dtype == "bf16",
        )
    except DeepSpeedConfigError as error:
        raise ConfigError(str(error)) from None


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
            config = _model_config(model.name_or_path, model.trust_remote_code)
            context = (
                getattr(config, "max_position_embeddings", None) if config is not None else None
            )
            if not isinstance(context, int) or context < 8:
                raise ConfigError(
                    f"model.max_length=null takes the model's own context, but {model.name_or_path!r} gives none "
                    "here (no max_position_embeddings in a locally readable config.json); set model.max_length=N"
                )
            length = min(context, CONTEXT_CAP)
        cfg.model.max_length = length
    # the embedded model's preset, with another model
    if model.name_or_path is not None and name == "tiny":
        name = (
            Path(model.name_or_path).expanduser().name
            if is_local(model.name_or_path)
            else model.name_or_path
        )
        cfg.model.name = name
    data = (
        settings.data
        if settings.data.max_length is not None
        else dataclasses.replace(settings.data, max_length=length)
    )
    return dataclasses.replace(
        settings, model=dataclasses.replace(model, max_length=length, name=name), data=data
    )


#: Seconds one request to the Hugging Face hub may take in :func:`check_model_source` (no retries:
#: an unreachable hub is said at once, not after huggingface_hub's five back-offs).
HUB_TIMEOUT_S = 10


def check_model_source(name_or_path: str | None, key: str = "model.name_or_path") -> None:
    """``name_or_path`` names a model this process can load; one :class:`ConfigError` naming it if not.

    Decided before any rank loads anything, so a wrong name is one line instead of a hub request
    (and its network wait) on every rank. By :mod:`falqon_dist.hub_names`' rule a local name
    (``/...``, ``./...``, ``~/...``, more than one ``/``, or a first component that exists here) must
    be a directory with a ``config.json``: it is never looked up on the hub. Any other name must be a
    valid hub id that is in the local Hugging Face cache or, the hub being reachable, on the hub: its
    ``config.json`` is fetched into the cache (so the model checks after this read it). With
    ``HF_HUB_OFFLINE=1`` or an unreachable hub, a name the cache does not hold is refused here.
    ``None`` (the embedded tiny model) needs nothing.
    """
    if name_or_path is None:
        return
    reason = local_reason(name_or_path)
    if reason is not None:
        directory = Path(name_or_path).expanduser()
        if not directory.is_dir():
            what = "not a directory" if directory.exists() else "no such model directory"
            raise ConfigError(
                f"{key}={name_or_path!r}: {what} (a local path, as {reason}: never looked up on the "
                "Hugging Face hub)"
            )
        if not (directory / "config.json").is_file():
            raise ConfigError(
                f"{key}={name_or_path!r}: no config.json there (a Hugging Face model directory)"
            )
        return
    problem = hub_id_problem(name_or_path)
    if problem is not None:
        raise ConfigError(
            f"{key}={name_or_path!r} is neither an existing local directory nor a Hugging Face hub id "
            f"('org/name'): {problem}"
        )
    _check_hub_model(name_or_path, key)


def _check_hub_model(name: str, key: str) -> None:
    """A hub id in the local cache, or fetched from the reachable hub (see :func:`check_model_source`)."""
    import huggingface_hub as hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if isinstance(hub.try_to_load_from_cache(name, "config.json"), str):
        return  # cached: loads offline too
    not_there = f"{key}={name!r} is neither a local directory nor reachable: "
    what_to_do = (
        f"its cache ({constants.HF_HUB_CACHE}) does not hold it. Give the model's local directory (a "
        f"relative one as ./{name}: a name like 'org/name' is a hub id), or download it first where the "
        f"hub is reachable (hf download {name})"
    )
    if hub_offline():
        raise ConfigError(
            not_there + "the Hugging Face hub is off here (HF_HUB_OFFLINE=1) and " + what_to_do
        )
    try:  # one HEAD, no retries; then the small config.json into the cache
        hub.get_hf_file_metadata(hub.hf_hub_url(name, "config.json"), timeout=HUB_TIMEOUT_S)
        hub.hf_hub_download(name, "config.json", etag_timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ConfigError(
            f"{key}={name!r}: no such local directory, and the hub model {name} is gated: accept its "
            f"terms at https://huggingface.co/{name} and log in (hf auth login, or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{key}={name!r}: no such local directory, and no model {name} on the Hugging Face hub (a "
            "private one needs a login: hf auth login, or HF_TOKEN)"
        ) from None
    except EntryNotFoundError as error:
        # huggingface_hub's "cannot connect and not cached"
        if isinstance(error, LocalEntryNotFoundError):
            raise ConfigError(
                not_there + "the Hugging Face hub cannot be reached and " + what_to_do
            ) from None
        raise ConfigError(
            f"{key}={name!r}: the hub repository {name} has no config.json (not a transformers "
            "model)"
        ) from None
    except Exception as error:  # noqa: BLE001 - network errors have no common base across huggingface_hub versions
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(
            not_there + f"the Hugging Face hub cannot be reached ({type(error).__name__}: {first}) "
            "and " + what_to_do
        ) from None


def _auto_map(name_or_path: str) -> dict[str, Any] | None:
    """The ``auto_map`` of the model's config.json (local, or in the hub cache), if it has one."""
    if is_local(name_or_path):
        path: str | Path | None = Path(name_or_path).expanduser() / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name_or_path, "config.json")
    try:
        auto_map = (
            json.loads(Path(path).read_text()).get("auto_map")
            if isinstance(path, (str, Path))
            else None
        )
    except (OSError, ValueError, AttributeError):
        return None
    return auto_map if isinstance(auto_map, dict) else None


def remote_code_refused(name_or_path: str) -> ConfigError:
    """The error for a model that only loads by running its own Python, with trust_remote_code off."""
    auto_map = _auto_map(name_or_path)
    code = f" (its config.json's auto_map: {auto_map})" if auto_map else ""
    return ConfigError(
        f"model.name_or_path={name_or_path!r} needs its own Python code to load{code}, and "
        "model.trust_remote_code=false: falqon_dist runs no code a model brings unless asked. Read that code, "
        "then set model.trust_remote_code=true, or use a model transformers supports natively"
    )


def _check_model_fits(settings: RunSettings) -> None:
    """``method.target_modules`` / ``exclude_modules`` against the model's layers, and FALQON's rank
    and topk against every layer it will convert (``check_convertible``, the check ``convert_model``
    runs after the load; its error names the field, worded here as the key), from the model's
    config alone."""
    method = settings.method
    trust = settings.model.trust_remote_code
    # a model needing its own code: refused here
    config = _model_config(settings.model.name_or_path, trust)
    # None: a hub name not in the local cache (checked at conversion)
    if config is None or method.name == "full":
        return
    import torch
    from transformers import AutoModelForCausalLM

    from falqon_dist.method import FalqonConfig
    from falqon_dist.method.convert import check_convertible
    from falqon_dist.method.swap import select_modules

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
        except ValueError as error:
            if "trust_remote_code" in str(error):
                raise remote_code_refused(str(settings.model.name_or_path)) from None
            raise
    try:
        chosen = select_modules(model, method.target_modules, method.exclude_modules)
    except ValueError as error:
        raise ConfigError(f"method.{error}") from None
    if method.name != "falqon":
        return
    falqon = settings.method.config
    assert isinstance(falqon, FalqonConfig)  # method=falqon
    try:
        names = check_convertible(model, falqon, module_filter_fn=chosen)
    except InvalidField as error:  # blames its field (rank or topk): worded as that Hydra key
        raise ConfigError(
            f"method.{error.field} {error.requirement}, got {error.value!r}"
        ) from None
    if not names:
        model_name = settings.model.name_or_path or "the embedded tiny model"
        raise ConfigError(
            f"method=falqon: {model_name} has no nn.Linear besides lm_head whose dimensions are "
            "multiples of 16: nothing to convert"
        )


def _model_config(name_or_path: str | None, trust_remote_code: bool = False):
    """The model's transformers config, read locally (None where only the hub has it), never running
    the model's own code unless ``trust_remote_code`` (:func:`remote_code_refused` otherwise)."""
    if name_or_path is None:
        from falqon_dist.models import tiny_config

        return tiny_config()
    from transformers import AutoConfig

    local = is_local(name_or_path)
    try:
        return AutoConfig.from_pretrained(
            str(Path(name_or_path).expanduser()) if local else name_or_path,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, TypeError) as error:  # TypeError: a field of the wrong type
        if isinstance(error, ValueError) and "trust_remote_code" in str(error):
            raise remote_code_refused(name_or_path) from None
        if local:
            raise ConfigError(
                f"model.name_or_path={name_or_path!r}: its config.json cannot be read ({error})"
            ) from None
        return None


def _check_data_path(name: str, path: str | tuple[str, ...] | None, key: str) -> None:
    """Each path of ``key`` exists, or (alpaca / oasst1 only) is a hub dataset id: a local-looking
    name (:mod:`falqon_dist.hub_names`, or a data file suffix) that does not exist is one error here,
    never a hub request later."""
    for one in path if isinstance(path, tuple) else (path,):
        if one is None or Path(one).expanduser().exists():
            continue
        if is_hub_dataset(name, one):
            continue  # read from the hub when the data is built
        shown = f"{key}={one!r}" if one == path else f"{key}: {one!r}"
        reason = local_reason(one)
        if reason is None and one.endswith(LOCAL_SUFFIXES):
            reason = f"it ends with {Path(one).suffix!r}"
        if reason is None and name in LOCAL_ONLY:
            reason = f"data={name} reads local files only"
        if reason is not None:
            raise ConfigError(
                f"{shown}: no such file or directory (a local path, as {reason}: never looked up on "
                "the Hugging Face hub)"
            )
        problem = hub_id_problem(one) or "a hub dataset id is 'org/name'"
        raise ConfigError(
            f"{shown}: no such file or directory, and not a Hugging Face hub dataset id: {problem}"
        )
