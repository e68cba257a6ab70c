"""Rebuild a trained FALQON model from its run directory, in ONE process, from any ZeRO stage.

``launch/export.py`` and ``launch/eval.py`` use this: no DeepSpeed engine and no process group, so a
run trained on N ranks (any ZeRO stage) is restored on a laptop-sized single process::

    restored = restore_run("runs/2025-01-01_12-00-00", tag="latest")
    restored.model        # the converted Hugging Face model, FP8 bytes exactly as checkpointed
    restored.tokenizer, restored.settings, restored.tag, restored.step

Restoring a run is run-level work (its saved config, its settings, the model it trained), so it
lives in ``train/``; the export it feeds (:func:`falqon_dist.export.export_fp8`) knows nothing of runs.

The checkpoint becomes one state dict through its format's owner
(:func:`falqon_dist.distributed.checkpoint.consolidated_state_dict`). The model's *structure* is
rebuilt as training built it, without reading a base weight: the architecture from the base model's
``config.json`` (``from_config``) with every parameter on the meta device, its linears swapped for
FALQON layers with the same filter and config (no SVD init: meta layers), then every parameter and
persistent buffer is taken from the checkpoint (``load_state_dict(strict=True, assign=True)``:
every key and shape must match). Buffers are built for real at construction: the non-persistent ones
a checkpoint does not hold (rotary ``inv_freq`` tables) are computed as training computed them.
Peak host memory is about the consolidated checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf
from torch import nn

from falqon_dist.distributed import checkpoint
from falqon_dist.method import FalqonConfig, FalqonLinear, convert_model, falqon_layers
from falqon_dist.train.model_setup import (
    TORCH_DTYPES,
    layer_filter,
    load_tokenizer,
    resolve_model_path,
)
from falqon_dist.train.saved_config import CHECKPOINTS, CONFIG_FILE, RestoreError, load_run_config
from falqon_dist.train.settings import RunSettings

__all__ = ["RestoreError", "RestoredRun", "restore_run"]

META = torch.device("meta")


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


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device (storage-free), one at a time as
    it is registered; buffers stay real, so what a module computes at construction (rotary tables)
    is there. A layer's initializer then runs on meta tensors: nothing is computed for weights that
    the checkpoint replaces."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device != META:
            module._parameters[name] = nn.Parameter(
                param.to(META), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_falqon_skeleton(model_path: str, settings: RunSettings) -> nn.Module:
    """The model converted exactly as training converted it, its parameters on the meta device: the
    architecture comes from ``model_path``'s config, no base weight is read and no SVD init runs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = settings.model.trust_remote_code
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(
            config, dtype=TORCH_DTYPES[settings.model.dtype], trust_remote_code=trust
        )
    convert_model(
        model,
        cast(FalqonConfig, settings.method.config),  # a FALQON run's settings (require_falqon)
        layer_builder=FalqonLinear.shaped_like,
        module_filter_fn=layer_filter(settings),
    )
    return model


def _owned(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` in ``like``'s dtype, as a tensor of its own: contiguous and not a view into a larger
    storage (a consolidated checkpoint may hand out views of one flat buffer)."""
    if value.dtype != like.dtype:
        return value.to(like.dtype).contiguous()
    whole = (
        value.storage_offset() == 0
        and value.untyped_storage().nbytes() == value.numel() * value.element_size()
    )
    return value.contiguous() if whole else value.clone(memory_format=torch.contiguous_format)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Put ``state`` into ``model`` (every key and shape must match; dtypes are the model's, except
    that a FALQON ``qweight`` must arrive as raw uint8 bytes: it is never converted). Meta tensors
    of ``model`` are replaced by the state's (``assign=True``); none may remain afterwards."""
    for name, _ in falqon_layers(model):
        key = f"{name}.qweight"
        if key in state and state[key].dtype != torch.uint8:
            raise RestoreError(
                f"{source}: {key} has dtype {state[key].dtype}, expected the uint8 FP8 codes"
            )
    expected = model.state_dict()
    owned = {
        key: _owned(value, expected[key]) if key in expected else value
        for key, value in state.items()
    }
    try:
        model.load_state_dict(owned, strict=True, assign=True)
    except RuntimeError as error:
        raise RestoreError(
            f"{source} does not match the model rebuilt from {CONFIG_FILE}: {error}"
        ) from None
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # type: ignore[operator]  # a transformers PreTrainedModel
    left = [
        name
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.device == META
    ]
    if left:
        raise RestoreError(f"{source}: the checkpoint holds no value for {', '.join(left[:5])}")


def restore_run(run_dir: str | Path, tag: str | int | None = "latest") -> RestoredRun:
    """Rebuild the FALQON model of ``run_dir`` from checkpoint ``tag`` in this process (eval mode).

    Raises :class:`RestoreError` naming the path or key for a missing run directory, config.yaml or
    checkpoint, a method other than FALQON, or a checkpoint that does not fit the config.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    cfg, settings = load_run_config(run_dir)
    require_falqon(settings, run_dir)
    ckpt_dir = run_dir / CHECKPOINTS
    try:
        tag = checkpoint.resolve_tag(ckpt_dir, tag)
        state, meta = checkpoint.consolidated_state_dict(
            ckpt_dir, tag, settings.deepspeed.zero_stage
        )
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
        config=cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True)),
        tag=tag,
        step=int(step) if step is not None else None,
        model=model,
        tokenizer=load_tokenizer(model_path, trust_remote_code=settings.model.trust_remote_code),
        model_path=model_path,
    )
