"""Building the model a run trains: base weights, tokenizer, and the fine-tuning method applied.

FALQON under ZeRO-3 is loaded partitioned from the start and converted layer by layer
(:mod:`falqon_dist.distributed.zero3_init`); every other combination loads the model on each rank and lets
``deepspeed.initialize`` partition it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import torch
import torch.distributed as tdist
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from falqon_dist.distributed.waits import barrier
from falqon_dist.distributed.zero3_init import load_pretrained_zero3
from falqon_dist.fp8.cast import set_cast_kernels
from falqon_dist.hub_names import is_local
from falqon_dist.method import FalqonConfig
from falqon_dist.method.swap import ModuleFilter, module_filter
from falqon_dist.methods import prepare_model
from falqon_dist.train.settings import RunSettings

log = logging.getLogger("falqon_dist")

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_model_path(settings: RunSettings) -> str:
    """The model directory or hub name; builds the embedded tiny model on rank 0 first if needed.

    A name is local or a hub id by :mod:`falqon_dist.hub_names`' rule, checked by
    :func:`~falqon_dist.train.preflight.check_model_source` (training has run it already; export and
    eval of a run reach it here): a local directory that does not exist (moved since training?) or a
    hub id neither cached nor reachable is one :class:`ConfigError` naming it, before any load, never
    a hub lookup of a missing directory.
    """
    name_or_path = settings.model.name_or_path
    if name_or_path is not None:
        from falqon_dist.train.preflight import check_model_source

        check_model_source(name_or_path)
        return str(Path(name_or_path).expanduser()) if is_local(name_or_path) else name_or_path
    from falqon_dist.models import build_tiny_model

    if tdist.is_initialized() and tdist.get_rank() != 0:
        barrier("let rank 0 build the embedded tiny model")  # then reuse its cache
        return str(build_tiny_model())
    path = build_tiny_model()
    barrier("let rank 0 build the embedded tiny model")
    return str(path)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer of ``path`` (pad = eos where it has none). ``trust_remote_code`` is passed
    explicitly (a run's ``model.trust_remote_code``): False refuses a tokenizer that needs its own
    code at once, instead of transformers' interactive prompt."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _local_accelerator() -> torch.device | None:
    """This rank's GPU, where the method's layers are built (SVD init, FP8 / NF4 quantization) one at a
    time after the model is loaded on the CPU; None without CUDA (everything stays on the CPU)."""
    if not torch.cuda.is_available():
        return None
    return torch.device("cuda", torch.cuda.current_device())


def parameter_facts(model: torch.nn.Module) -> dict[str, int]:
    """``params`` and ``trainable_params`` (elements each stands for) and ``param_bytes`` (their
    storage: an FP8 ``qweight`` counts 1 byte per element, an NF4 weight its packed bytes), whole
    model, whatever the ZeRO stage."""
    params = list(model.parameters())
    stored = sum(
        (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size() for p in params
    )
    return {
        "params": sum(_numel(p) for p in params),
        "trainable_params": sum(_numel(p) for p in params if p.requires_grad),
        "param_bytes": stored,
    }


def _numel(param: torch.Tensor) -> int:
    """Elements a parameter stands for: whole under ZeRO-3, unpacked for bitsandbytes 4-bit weights."""
    if hasattr(param, "ds_numel"):
        return param.ds_numel
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return quant_state.shape.numel()
    return param.numel()


def layer_filter(settings: RunSettings) -> ModuleFilter:
    """The layers a run adapts: ``method.target_modules`` minus ``method.exclude_modules`` (training
    and restore share it; preflight has checked the patterns against the model)."""
    return module_filter(settings.method.target_modules, settings.method.exclude_modules)


def build_model(path: str, settings: RunSettings, ds_config: dict) -> torch.nn.Module:
    """Load ``path`` and apply the configured method; returns the model ready for ``initialize``."""
    method, dtype = settings.method, TORCH_DTYPES[settings.model.dtype]
    set_cast_kernels(settings.fp8.cast)
    chosen = layer_filter(settings)
    if method.name == "falqon" and settings.deepspeed.zero_stage == 3:
        model, names = load_pretrained_zero3(
            path,
            ds_config,
            cast(FalqonConfig, method.config),
            dtype=dtype,
            module_filter_fn=chosen,
            trust_remote_code=settings.model.trust_remote_code,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=settings.model.trust_remote_code
        )
        names = prepare_model(
            model, method.config, device=_local_accelerator(), module_filter_fn=chosen
        )
    if settings.model.gradient_checkpointing:
        cast(PreTrainedModel, model).gradient_checkpointing_enable()
    facts = parameter_facts(model)
    trainable, total = facts["trainable_params"], facts["params"]
    log.info(
        "method=%s: %d modules targeted, %s trainable of %s parameters",
        method.name,
        len(names),
        f"{trainable:,}",
        f"{total:,}",
    )
    return model
