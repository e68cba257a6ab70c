"""``export_fp8``: a trained FALQON model → a compressed-tensors FP8 Hugging Face model directory.

The FP8 codes and scales of every FALQON layer are written as they are (no requantization): the
exported ``<name>.weight`` is the W rows of ``M_q`` (the adapter rows A are dropped, and B is zero
after the merge), ``<name>.weight_scale`` is the layer's scale. Everything else keeps its dtype.

Tensors are produced one module at a time and streamed into safetensors shards, so memory holds at
most one module plus one shard. Under ZeRO-3 each module's parameters are gathered just for the
moment they are copied (:func:`gathered`); every rank takes part in the gathers, only rank 0 writes.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from falqon_dist.distributed.merge import merge_model_
from falqon_dist.distributed.proxies import ProxyMasters
from falqon_dist.distributed.zero_facts import is_partitioned
from falqon_dist.export.format import SCALE_SUFFIX, WEIGHT_SUFFIX, quantization_config
from falqon_dist.export.run_info import write_run_info
from falqon_dist.export.staging import StagedDirectory, check_destination
from falqon_dist.export.writer import ShardWriter, parse_size
from falqon_dist.fp8 import E4M3, from_bits
from falqon_dist.method import FalqonLinear, falqon_layers

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- ranks
def gathered(params: list[nn.Parameter], *, modify: bool = False) -> AbstractContextManager:
    """Context in which ``params`` hold their full data (a no-op unless they are ZeRO-3 partitioned).

    ``modify=True`` keeps rank 0's in-place changes (DeepSpeed re-partitions them to every rank);
    otherwise changes made inside are discarded on exit.
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        return nullcontext()
    import deepspeed  # needed only for ZeRO-3 models

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _from_rank0(obj: Any) -> Any:
    """``obj`` as rank 0 sees it, on every rank (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------- model
def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside ``model``: itself, or what wrappers expose as ``.module``.

    A DeepSpeed engine (which has a ``.config`` of its own), DDP, … are unwrapped until a
    ``transformers.PreTrainedModel`` is reached.
    """
    from transformers import PreTrainedModel

    found = model
    while not isinstance(found, PreTrainedModel):
        inner = getattr(found, "module", None)
        if not isinstance(inner, nn.Module) or inner is found:
            raise ValueError(
                "export_fp8 needs a Hugging Face PreTrainedModel or a wrapper exposing one as .module "
                f"(a DeepSpeed engine); got {type(model).__name__}"
            )
        found = inner
    return found


@torch.no_grad()
def merge_pending_proxies_(model: nn.Module) -> list[str]:
    """Fold what B still holds into the FP8 backbone of every FALQON layer whose B is non-zero;
    return the names of those layers.

    The trainer folds B into the backbone after its last step (``ProxyMergeHook.fold``), so B is zero
    in a run's final checkpoint; in an earlier one it holds the rows no merge took yet (``topk_carry``,
    ``topk_keep``), the carry (``every_row``, ``topk_carry``) or the updates since the last merge
    (``merge_every``), and they are folded here the same way, through the same model-level merge
    (:func:`~falqon_dist.distributed.merge.merge_model_` with ``fold=True``: every row, nearest,
    nothing carried, B zeroed, byte for byte the trainer's final fold), so the live model computes
    exactly what the export holds. The fold changes the model in place (under ZeRO-3, each rank its
    partitions). An optimizer's fp32 master copy of B is NOT zeroed (the parameters are B's masters
    here): to keep training afterwards, fold through the trainer's post-step hook before exporting.
    """
    pending = []
    for name, layer in falqon_layers(model):
        with gathered([layer.B]):
            if bool(layer.B.detach().ne(0).any()):
                pending.append((name, layer))
    if pending:
        merge_model_(model, ProxyMasters(), fold=True, layers=pending)
    merged = [name for name, _ in pending]
    # a pending B in a layer whose merges zero all of B (the paper's): an update no merge took
    unexpected = [
        name for name, layer in pending if layer.unmerged != "keep" and not layer.carry_residual
    ]
    if unexpected:
        logger.warning(
            "export_fp8 merged pending proxy updates of %d FALQON layer(s) (first: %s); an optimizer "
            "master copy of B, if any, was not zeroed",
            len(merged),
            merged[0],
        )
    elif merged:
        logger.info(
            "export_fp8 merged what B still held (unmerged rows or the carry) in %d layer(s)",
            len(merged),
        )
    return merged


def ignored_linears(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules that stay in float (every linear FALQON did not convert)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _module_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """``(local key, tensor, registered owner)`` of one module's own checkpoint entries.

    ``owner`` is the module's registered Parameter/buffer the tensor is (used to spot tensors shared
    between modules), or ``None`` for a derived tensor such as a FALQON layer's W rows.
    """
    if isinstance(module, FalqonLinear):
        yield WEIGHT_SUFFIX, from_bits(module.qweight.detach(), E4M3)[: module.out_features], None
        yield SCALE_SUFFIX, module.scale.detach(), module.scale
        if module.bias is not None:
            yield "bias", module.bias.detach(), module.bias
        return
    for key, param in module.named_parameters(recurse=False):
        yield key, param.detach(), param
    for key, buffer in module.named_buffers(recurse=False):
        if key not in module._non_persistent_buffers_set:
            yield key, buffer.detach(), buffer


def checkpoint_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every ``(checkpoint key, CPU tensor copy)`` of the export, module by module.

    Each module's parameters are gathered (ZeRO-3) only while its tensors are copied to the host.
    A tensor shared by several modules (tied embeddings) is emitted once, under its first name, as
    ``save_pretrained`` does. Every rank must iterate this to the end (the gathers are collective).
    """
    seen: set[int] = set()  # ids of registered tensors already emitted (they stay alive meanwhile)
    for prefix, module in model.named_modules():
        with gathered(list(module.parameters(recurse=False))):
            for key, tensor, owner in _module_tensors(module):
                if owner is not None:
                    if id(owner) in seen:
                        continue
                    seen.add(id(owner))
                name = f"{prefix}.{key}" if prefix else key
                yield name, tensor.to("cpu", copy=True)


# --------------------------------------------------------------------------------------------- files
def _write_metadata(
    model: nn.Module, directory: Path, ignore: list[str], tokenizer: Any | None
) -> None:
    """``config.json`` (with ``quantization_config``), ``generation_config.json``, the tokenizer."""
    config: Any = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if getattr(model, "dtype", None) is not None:
        config.dtype = model.dtype
    config.quantization_config = quantization_config(ignore)
    config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if generation_config is not None and can_generate():
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def export_fp8(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer: Any | None = None,
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
    run_info: dict[str, Any] | None = None,
) -> Path:
    """Export a FALQON-converted causal LM as a compressed-tensors ``float-quantized`` FP8 model.

    ``model`` is the Hugging Face model passed to :func:`falqon_dist.convert_model`, or a wrapper
    exposing it as ``.module`` (a DeepSpeed engine). Pending proxy updates are merged first
    (:func:`merge_pending_proxies_`). The directory then holds ``config.json`` with the
    ``quantization_config``, safetensors shards (``model.safetensors``, or numbered shards of at most
    ``max_shard_size`` plus ``model.safetensors.index.json``), ``generation_config.json`` when the model
    has one, and the tokenizer's files when ``tokenizer`` is given. Loadable with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` when compressed-tensors is installed (W8A8
    fake-quant forward; add ``quantization_config=CompressedTensorsConfig(dequantize=True)`` for float
    weights); it is the layout vLLM's compressed-tensors FP8 path reads.

    The export is staged in a sibling directory and renamed into place: ``out_dir`` either keeps its
    previous content or holds the complete export. An existing non-empty ``out_dir`` raises
    ``FileExistsError`` unless ``overwrite=True``. ``run_info`` (the keyword arguments of
    :func:`~falqon_dist.export.run_info.write_run_info`: where the model came from) is written as
    ``falqon_run.json`` inside the same atomic commit. Files are readable as the process's umask
    allows (as ``config.json`` is: a server under another account can load the export). A model
    without FALQON layers raises ``ValueError``.
    Distributed: call it on every rank (ZeRO-3 gathers are collective); rank 0 writes. Returns ``out_dir``.
    """
    model = unwrap_model(model)
    out_dir = Path(out_dir)
    if not falqon_layers(model):
        raise ValueError(
            f"{type(model).__name__} has no FalqonLinear layer: convert it with falqon_dist.convert_model "
            "(and train it) before export_fp8"
        )
    max_shard_bytes = parse_size(max_shard_size)
    writes = _rank() == 0

    problem = None
    if writes:
        try:
            check_destination(out_dir, overwrite)
        except FileExistsError as exists:
            problem = str(exists)
    problem = _from_rank0(problem)
    if problem is not None:
        raise FileExistsError(problem)

    merge_pending_proxies_(model)
    ignore = ignored_linears(model)

    staging: StagedDirectory | None = None
    error: Exception | None = None
    if writes:
        try:
            staging = StagedDirectory(out_dir, overwrite)
        except Exception as caught:  # noqa: BLE001 - raised below, once every rank has finished
            error = caught
    try:
        writer = ShardWriter(staging.path, max_shard_bytes) if staging is not None else None
        error = _stream_tensors(model, writer) or error  # every rank visits every module
        if staging is not None and writer is not None and error is None:
            files = writer.finish()
            _write_metadata(model, staging.path, ignore, tokenizer)
            if run_info is not None:
                write_run_info(staging.path, **run_info)
            staging.commit()
            logger.info(
                "exported %d tensors (%d bytes, %d file(s)) to %s",
                writer.num_tensors,
                writer.total_bytes,
                len(files),
                out_dir,
            )
    except Exception as caught:  # noqa: BLE001 - raised below
        error = error or caught
    finally:
        if staging is not None:
            staging.discard()
    rank0_error = _from_rank0(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if rank0_error is not None:
        raise RuntimeError(f"export_fp8 failed on rank 0: {rank0_error}")
    return out_dir


def _stream_tensors(model: nn.Module, writer: ShardWriter | None) -> Exception | None:
    """Feed every checkpoint tensor to ``writer`` (``None`` on ranks that only help gather).

    A write error does not stop the iteration: the other ranks are still gathering module by module,
    so this rank keeps taking part and returns the error once every module has been visited.
    """
    failure: Exception | None = None
    for name, tensor in checkpoint_tensors(model):
        if writer is None:
            continue
        try:
            writer.add(name, tensor)
        except Exception as caught:  # noqa: BLE001 - returned to the caller
            failure, writer = caught, None
    return failure
