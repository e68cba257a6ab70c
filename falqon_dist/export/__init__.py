"""Export a trained FALQON model as an FP8 checkpoint for inference engines.

The output is a Hugging Face model directory in compressed-tensors' ``float-quantized`` format
(per-tensor FP8 E4M3 weights, dynamic per-token FP8 activations), loadable by transformers (with
compressed-tensors installed) and vLLM. The trained FP8 bytes and scales are written unchanged::

    from falqon_dist.export import export_fp8
    export_fp8(model, "out/fp8", tokenizer=tokenizer)
"""

from falqon_dist.export.exporter import export_fp8

__all__ = ["export_fp8"]
