"""Rebuild a trained FALQON model from its run directory, in ONE process, from any ZeRO stage.

``launch/export.py`` and ``launch/eval.py`` use this: no DeepSpeed engine and no process group, so a
run trained on N ranks (any ZeRO stage) is restored on a laptop-sized single process::

    restored = restore_run("runs/2025-01-01_12-00-00", tag="latest")
    restored.model        # the converted Hugging Face model, FP8 bytes exactly as checkpointed
    restored.tokenizer, restored.settings, restored.tag, restored.step

The checkpoint becomes one state dict through its format's owner
(:func:`falqon_dist.distributed.checkpoint.consolidated_state_dict`). The model is rebuilt as
training built it: the base model from ``model.name_or_path`` (or the embedded tiny model) in
``model.dtype``, its linears swapped for FALQON layers with the same filter and config, but WITHOUT
the SVD initialization (every tensor is then overwritten by the checkpoint;
``load_state_dict(strict=True)`` checks that every key and shape matches). Loading the base weights
first keeps whatever the architecture computes at construction (rotary tables, …); peak host memory
is about the base model in ``model.dtype`` plus the consolidated checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from falqon_dist.distributed import checkpoint
from falqon_dist.method import FalqonLinear, convert_model, falqon_layers
from falqon_dist.train.saved_config import CHECKPOINTS, CONFIG_FILE, RestoreError, load_run_config
from falqon_dist.train.settings import RunSettings

__all__ = ["RestoreError", "RestoredRun", "restore_run"]


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


def require_falqon(settings: RunSettings, run_dir: Path) -> None:
    if settings.method.name != "falqon":
        raise RestoreError(
            f"{run_dir / CONFIG_FILE}: method.name={settings.method.name!r}; FP8 export and this restore need "
            "method=falqon (the other methods keep no FP8 backbone)"
        )


def build_falqon_skeleton(model_path: str, settings: RunSettings) -> nn.Module:
    """The base model converted exactly as training converted it, without running the SVD init."""
    from transformers import AutoModelForCausalLM

    from falqon_dist.train.model_setup import TORCH_DTYPES, layer_filter

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=TORCH_DTYPES[settings.model.dtype],
                                                 trust_remote_code=settings.model.trust_remote_code)
    convert_model(model, settings.method.config, layer_builder=FalqonLinear.shaped_like,
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
    try:
        tag = checkpoint.resolve_tag(ckpt_dir, tag)
        state, meta = checkpoint.consolidated_state_dict(ckpt_dir, tag, settings.deepspeed.zero_stage)
    except checkpoint.CheckpointReadError as error:
        raise RestoreError(str(error)) from None

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
        tokenizer=load_tokenizer(model_path, trust_remote_code=settings.model.trust_remote_code),
        model_path=model_path,
    )
