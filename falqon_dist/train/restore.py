"""Rebuild a trained FALQON model from its run directory, in ONE process, from any ZeRO stage.

``launch/export.py`` and ``launch/eval.py`` use this: no DeepSpeed engine and no process group, so a
run trained on N ranks (any ZeRO stage) is restored on a laptop-sized single process::

    restored = restore_run("runs/2025-01-01_12-00-00", tag="latest")
    restored.model        # the converted Hugging Face model, FP8 bytes exactly as checkpointed
    restored.tokenizer, restored.settings, restored.tag, restored.step

How the checkpoint becomes a state dict (``consolidated_state_dict``):

* ZeRO-0/1/2: rank 0's ``mp_rank_00_model_states.pt`` holds the whole module state dict in the
  module's own dtypes (``qweight`` uint8, ``scale`` fp32, the rest in the run's dtype).
* ZeRO-3: every rank's ``zero_pp_rank_R_mp_rank_00_model_states.pt`` holds its slice of each frozen
  parameter in its own dtype (``frozen_param_fragments``: the uint8 FP8 codes stay uint8) and the
  buffers; the fp32 masters of the trainable proxies B are in the optimizer-state files. DeepSpeed's
  public ``get_fp32_state_dict_from_zero_checkpoint`` concatenates the slices (no cast of frozen
  parameters; buffers are read as fp32, which the scales already are) for any saved world size.

The model is rebuilt as training built it: the base model from ``model.name_or_path`` (or the
embedded tiny model) in ``model.dtype``, its linears swapped for FALQON layers with the same filter,
rank and backend, but WITHOUT the SVD initialization (every tensor is then overwritten by the
checkpoint; ``load_state_dict(strict=True)`` checks that every key and shape matches). Loading the
base weights first keeps whatever the architecture computes at construction (rotary tables, …); peak
host memory is about the base model in ``model.dtype`` plus the consolidated checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from falqon_dist.distributed import checkpoint
from falqon_dist.fp8 import check_backend
from falqon_dist.method import FalqonLinear, convert_model, falqon_layers
from falqon_dist.train.settings import ConfigError, RunSettings, validate

log = logging.getLogger("falqon_dist")

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
#: Model-state file of ZeRO-0/1/2 checkpoints (rank 0 writes the whole module).
REPLICATED_STATES = "mp_rank_00_model_states.pt"
#: Model-state files of ZeRO-3 checkpoints (one per rank: that rank's slices of frozen parameters).
PARTITIONED_STATES = "zero_pp_rank_*_mp_rank_00_model_states.pt"


class RestoreError(RuntimeError):
    """A run directory that cannot be restored; the message names the missing path or bad key."""


@dataclass
class RestoredRun:
    """A run's model rebuilt from one of its checkpoints (see :func:`restore_run`)."""

    run_dir: Path
    settings: RunSettings
    #: The resolved training config (``run.dir/config.yaml``) as a plain dict.
    config: dict[str, Any]
    tag: str
    #: Optimizer step of the checkpoint (from its client state; ``None`` if not recorded).
    step: int | None
    model: nn.Module
    tokenizer: Any
    #: Where the base model and tokenizer were loaded from.
    model_path: str


# --------------------------------------------------------------------------------------------- config
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


def require_falqon(settings: RunSettings, run_dir: Path) -> None:
    if settings.method.name != "falqon":
        raise RestoreError(
            f"{run_dir / CONFIG_FILE}: method.name={settings.method.name!r}; FP8 export and this restore need "
            "method=falqon (the other methods keep no FP8 backbone)"
        )


def resolve_tag(ckpt_dir: Path, tag: str | int | None = "latest") -> str:
    """``latest`` (the complete checkpoint ``checkpoints/latest`` names), ``step_00000300`` or ``300``."""
    if not ckpt_dir.is_dir():
        raise RestoreError(f"{ckpt_dir} not found: the run saved no checkpoint")
    if tag is None or str(tag) == checkpoint.LATEST:
        found = checkpoint.latest_tag(ckpt_dir)
        if found is None:
            raise RestoreError(f"{ckpt_dir / checkpoint.LATEST} does not name a complete checkpoint")
        return found
    text = str(tag)
    if text.isdigit():
        text = checkpoint.tag_for(int(text))
    if not (ckpt_dir / text).is_dir():
        available = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and checkpoint.TAG_PATTERN.match(p.name))
        raise RestoreError(f"checkpoint {ckpt_dir / text} not found; available tags: {available or 'none'}")
    return text


# --------------------------------------------------------------------------------------------- state
def consolidated_state_dict(ckpt_dir: Path, tag: str, zero_stage: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The full module state dict saved under ``ckpt_dir/tag`` by a run with ``zero_stage``, and the
    rest of rank 0's model-state file (client state such as ``step``; the module entry removed)."""
    directory = ckpt_dir / tag
    if zero_stage == 3:
        files = sorted(directory.glob(PARTITIONED_STATES))
        if not files:
            raise RestoreError(f"{directory}: no {PARTITIONED_STATES} (the config says deepspeed.zero_stage=3)")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # it prints a report per file and tqdm bars: keep the CLI's output to its own summary
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        meta_file = directory / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    else:
        meta_file = directory / REPLICATED_STATES
        if not meta_file.is_file():
            raise RestoreError(f"{meta_file} not found (the config says deepspeed.zero_stage={zero_stage})")
        state = None
    meta = torch.load(meta_file, map_location="cpu", weights_only=False)
    module_state = meta.pop("module")
    return (module_state if state is None else state), meta


def build_falqon_skeleton(model_path: str, settings: RunSettings) -> nn.Module:
    """The base model converted exactly as training converted it, without running the SVD init."""
    from transformers import AutoModelForCausalLM

    from falqon_dist.train.model_setup import TORCH_DTYPES, falqon_config, layer_filter

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=TORCH_DTYPES[settings.model.dtype])
    convert_model(model, falqon_config(settings), layer_builder=FalqonLinear.shaped_like,
                  module_filter_fn=layer_filter(settings))  # fmt: skip
    return model


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``state`` into ``model`` (every key and shape must match; dtypes are the model's, except
    that a FALQON ``qweight`` must arrive as raw uint8 bytes: it is never converted)."""
    for name, layer in falqon_layers(model):
        key = f"{name}.qweight"
        if key in state and state[key].dtype != torch.uint8:
            raise RestoreError(f"{source}: {key} has dtype {state[key].dtype}, expected the uint8 FP8 codes")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise RestoreError(f"{source} does not match the model rebuilt from {CONFIG_FILE}: {error}") from None


def restore_run(run_dir: str | Path, tag: str | int | None = "latest") -> RestoredRun:
    """Rebuild the FALQON model of ``run_dir`` from checkpoint ``tag`` in this process (eval mode).

    Raises :class:`RestoreError` naming the path or key for a missing run directory, config.yaml or
    checkpoint, a method other than FALQON, or a checkpoint that does not fit the config.
    """
    from falqon_dist.train.model_setup import load_tokenizer, resolve_model_path

    run_dir = Path(run_dir).expanduser().resolve()
    cfg, settings = load_run_config(run_dir)
    require_falqon(settings, run_dir)
    ckpt_dir = run_dir / CHECKPOINTS
    tag = resolve_tag(ckpt_dir, tag)
    state, meta = consolidated_state_dict(ckpt_dir, tag, settings.deepspeed.zero_stage)

    model_path = resolve_model_path(settings)
    model = build_falqon_skeleton(model_path, settings)
    load_into(model, state, ckpt_dir / tag)
    del state
    model.eval()
    step = meta.get("step")
    return RestoredRun(
        run_dir=run_dir,
        settings=settings,
        config=OmegaConf.to_container(cfg, resolve=True),
        tag=tag,
        step=int(step) if step is not None else None,
        model=model,
        tokenizer=load_tokenizer(model_path),
        model_path=model_path,
    )
