"""Export a trained FALQON model as an FP8 checkpoint for inference engines.

The output is a Hugging Face model directory in compressed-tensors' ``float-quantized`` format
(per-tensor FP8 E4M3 weights, dynamic per-token FP8 activations), loadable by transformers (with
compressed-tensors installed) and vLLM. The trained FP8 bytes and scales are written unchanged::

    from falqon_dist.export import export_fp8
    export_fp8(model, "out/fp8", tokenizer=tokenizer)

A converted model's ``model.save_pretrained(dir)`` writes the same export
(:mod:`falqon_dist.export.save_pretrained`, registered with the method on import). ``export_fp8`` is
imported on first use: importing this package (``import falqon_dist`` does, for that registration)
loads neither DeepSpeed nor the exporter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from falqon_dist.export import save_pretrained as _save_pretrained  # noqa: F401  (registers the saver)

if TYPE_CHECKING:
    from falqon_dist.export.exporter import export_fp8

__all__ = ["export_fp8"]


def __getattr__(name: str) -> Any:
    if name == "export_fp8":
        from falqon_dist.export.exporter import export_fp8

        return export_fp8
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
