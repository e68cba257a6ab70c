"""``save_pretrained`` of a FALQON-converted model: the FP8 export, registered with the method.

:func:`~falqon_dist.method.convert_model` routes a converted model's ``save_pretrained`` to the saver
registered with :func:`falqon_dist.method.convert.register_saver`; importing this module registers
:func:`save_pretrained_fp8` there (``import falqon_dist`` imports it). transformers' own
``save_pretrained`` would write FalqonLinear state under names ``from_pretrained`` does not know, and
the reloaded model would get every converted linear randomly initialized, without an error; the FP8
export loads back with transformers (compressed-tensors) with the trained weights.

Importing this module stays light (no DeepSpeed, no transformers): the exporter is imported on the
first save.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from falqon_dist.method.convert import register_saver

#: ``save_pretrained`` keywords the FP8 export honours or can ignore (Trainer passes them).
SAVE_KWARGS_IGNORED = (
    "state_dict",
    "safe_serialization",
    "is_main_process",
    "save_function",
    "push_to_hub",
)


def save_pretrained_fp8(
    model: nn.Module, save_directory: str | Path, *, max_shard_size: int | str = "2GB", **kwargs
):
    """Write the FP8 export of this FALQON model to ``save_directory`` (see
    :func:`~falqon_dist.export.export_fp8`), overwriting what a previous save left there.

    Takes ``save_directory`` and ``max_shard_size``; the keywords in :data:`SAVE_KWARGS_IGNORED` are
    accepted as the HF Trainer passes them (``is_main_process=False`` writes nothing). Anything the
    export cannot honour (``safe_serialization=False``, ``push_to_hub``, other keywords) is a
    ``TypeError``. Under ZeRO-3 the export gathers collectively on every rank, which
    ``save_pretrained`` callers (the HF Trainer saves on rank 0 only) do not do: a ``RuntimeError``
    there names what to call instead.
    """
    unknown = sorted(set(kwargs) - set(SAVE_KWARGS_IGNORED))
    if unknown or kwargs.get("safe_serialization", True) is False or kwargs.get("push_to_hub"):
        raise TypeError(
            f"save_pretrained of a FALQON-converted model writes the FP8 export (falqon_dist.export.export_fp8: "
            f"safetensors, compressed-tensors format) and takes save_directory and max_shard_size; got "
            f"{unknown or ['safe_serialization=False' if kwargs.get('safe_serialization') is False else 'push_to_hub']}"
        )
    # ZeRO-3 partitioned (DeepSpeed's mark)
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise RuntimeError(
            "save_pretrained cannot write a ZeRO-3 partitioned FALQON model from one rank: call "
            "falqon_dist.export.export_fp8(model, out_dir) on every rank (falqon_dist.integrations.FalqonCallback "
            "does it at the end of training; set TrainingArguments(save_strategy='no') or "
            "stage3_gather_16bit_weights_on_model_save=false for the Trainer's own saves)"
        )
    if kwargs.get("is_main_process", True) is False:
        return None
    from falqon_dist.export.exporter import (
        export_fp8,  # DeepSpeed and safetensors: only when a model is saved
    )

    return export_fp8(model, save_directory, max_shard_size=max_shard_size, overwrite=True)


register_saver(save_pretrained_fp8)
