"""The methods users would pick instead of FALQON, behind one entry point.

* ``lora`` — bf16 LoRA through peft (:func:`apply_lora`);
* ``fp8_lora`` — FP8 backbone + separately quantized FP8 LoRA path (:class:`Fp8LoraLinear`,
  :func:`convert_fp8_lora`), the torchao-style baseline;
* ``full`` — every parameter trainable (:func:`prepare_full_finetune`);
* ``qlora`` — NF4 backbone through bitsandbytes + peft LoRA (:func:`apply_qlora`; bitsandbytes is
  imported only when it is used).

:func:`prepare_model` applies any of :data:`METHODS` (FALQON included) in place::

    names = prepare_model(model, "fp8_lora", rank=64, backend="auto")
"""

from falqon_dist.baselines.fp8_lora import QUANTIZE_OPS_PER_STEP, Fp8LoraLinear, convert_fp8_lora
from falqon_dist.baselines.full import prepare_full_finetune
from falqon_dist.baselines.lora import apply_lora
from falqon_dist.baselines.qlora import apply_qlora
from falqon_dist.baselines.registry import METHODS, prepare_model
from falqon_dist.method.swap import target_module_names

__all__ = [
    "METHODS",
    "QUANTIZE_OPS_PER_STEP",
    "Fp8LoraLinear",
    "apply_lora",
    "apply_qlora",
    "convert_fp8_lora",
    "prepare_full_finetune",
    "prepare_model",
    "target_module_names",
]
