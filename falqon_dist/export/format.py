"""The compressed-tensors ``float-quantized`` description of a FALQON export (``config.json``).

A FALQON layer keeps its backbone as E4M3 codes with ONE fixed tensor-wise scale (``real = fp8 × s``),
which is exactly compressed-tensors' FP8 *tensor* strategy: the checkpoint holds ``<name>.weight``
(``float8_e4m3fn``) and ``<name>.weight_scale`` (float32, shape ``(1,)``), and a loader dequantizes with
``weight.float() × weight_scale``. Inputs are declared as dynamic per-token FP8 (the scheme vLLM runs
with FP8 GEMMs). The dict below is written by hand so exporting does not need compressed-tensors; it is
what ``compressed_tensors.quantization.QuantizationConfig(...).model_dump()`` produces for this scheme
(a unit test checks that round trip).
"""

from __future__ import annotations

from typing import Any

#: ``quant_method`` / ``format`` values understood by transformers' and vLLM's compressed-tensors loaders.
QUANT_METHOD = "compressed-tensors"
FORMAT = "float-quantized"

#: Checkpoint suffixes of one quantized linear (``<module name>.<suffix>``).
WEIGHT_SUFFIX = "weight"
SCALE_SUFFIX = "weight_scale"


def _fp8_args(strategy: str, dynamic: bool) -> dict[str, Any]:
    """QuantizationArgs of a symmetric FP8 (E4M3) tensor."""
    return {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "group_size": None,
        "strategy": strategy,
        "dynamic": dynamic,
    }


def quantization_config(ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json``.

    Every ``nn.Linear`` (target ``"Linear"``) is FP8 with a static per-tensor weight scale and dynamic
    per-token FP8 inputs, except the modules named in ``ignore`` (exact module names), which stay in
    their float dtype.
    """
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _fp8_args("tensor", dynamic=False),
                "input_activations": _fp8_args("token", dynamic=True),
                "output_activations": None,
                "format": FORMAT,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
