"""The methods users would pick instead of FALQON, behind one entry point.

* ``lora`` — bf16 LoRA through peft (:func:`apply_lora`);
* ``fp8_lora`` — FP8 backbone + separately quantized FP8 LoRA path (:class:`Fp8LoraLinear`,
  :func:`convert_fp8_lora`), the torchao-style baseline;
* ``full`` — every parameter trainable (:func:`prepare_full_finetune`);
* ``qlora`` — NF4 backbone through bitsandbytes + peft LoRA (:func:`apply_qlora`; bitsandbytes is
  imported only when it is used).

Each has a frozen config in :mod:`falqon_dist.baselines.config` and is applied as FALQON's
``convert_model`` is, ``fn(model, config, *, device=None, module_filter_fn=None) -> names``;
:mod:`falqon_dist.methods` puts them and FALQON behind one entry point::

    names = apply_lora(model, LoraConfig(rank=16, dropout=0.05))
    names = prepare_model(model, Fp8LoraConfig(rank=64, backend="auto"))
"""

from falqon_dist.baselines.config import Fp8LoraConfig, FullConfig, LoraConfig, QloraConfig
from falqon_dist.baselines.fp8_lora import QUANTIZE_OPS_PER_STEP, Fp8LoraLinear, convert_fp8_lora
from falqon_dist.baselines.full import prepare_full_finetune
from falqon_dist.baselines.lora import apply_lora
from falqon_dist.baselines.qlora import apply_qlora
from falqon_dist.method.swap import target_module_names

__all__ = [
    "QUANTIZE_OPS_PER_STEP",
    "Fp8LoraConfig",
    "Fp8LoraLinear",
    "FullConfig",
    "LoraConfig",
    "QloraConfig",
    "apply_lora",
    "apply_qlora",
    "convert_fp8_lora",
    "prepare_full_finetune",
    "target_module_names",
]
