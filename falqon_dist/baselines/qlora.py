"""QLoRA: a frozen 4-bit NormalFloat (NF4) backbone through bitsandbytes + LoRA adapters through peft.

The recipe of Dettmers et al. (2023), as most users run it: every targeted ``nn.Linear`` becomes a
``bitsandbytes.nn.Linear4bit`` holding ``W`` in NF4 (block size 64, double quantization of the
block scales), the compute dtype is the model's dtype (bf16 for a bf16 model), and peft LoRA
adapters (``A`` kaiming-uniform, ``B = 0``, in the compute dtype) are the only trainable tensors::

    y = dequant_nf4(W_q, absmax) x  +  (α/r) · B A dropout(x)

Why it is here: QLoRA is what people pick when the backbone does not fit in bf16, so FALQON's
memory and speed are measured against it (``benchmarks/bench_model.py``) and it trains through the same
launcher (``method=qlora``).

Memory of the backbone, per parameter: NF4 codes 4 bits (two per ``uint8``) + one ``absmax`` scale
per 64-block. Without double quantization that scale is fp32: 32/64 = 0.5 bit, 4.5 bits in all
(0.5625 bytes). Double quantization (``double_quant=True``, the default) stores the scales as 8-bit
codes (8/64 = 0.125 bit) with one fp32 scale per 256 of them (32/(64·256) ≈ 0.002 bit): ≈ 4.127 bits,
0.516 bytes per parameter, against 2 bytes for a bf16 backbone and 1 (+ r/out) for FALQON's FP8.

What it costs: the GEMMs stay in the compute dtype. Every forward dequantizes ``W`` to a transient
out × in tensor in the compute dtype (2 bytes/param for one layer at a time) and multiplies;
backward dequantizes it again for ∂L/∂x (the dequantized ``W`` is not kept, to save memory). So per
layer per step: 2 dequantizations and the same two backbone GEMMs as bf16 LoRA, plus the adapter
GEMMs: slower than bf16 LoRA, never faster. With double quantization each dequantization first
dequantizes the 8-bit scales.

Distributed: ZeRO stages 0–2 keep a full NF4 replica on every rank (``uint8`` parameters broadcast
and checkpointed like any frozen tensor). ZeRO-3 is not supported: it flattens and partitions
parameters, and a ``Params4bit`` carries its ``quant_state`` (scales, shape, dtype) as a Python
attribute that partitioning neither shards nor restores (``train/settings.py`` rejects the
combination before any work starts).

Checkpoints: ``Linear4bit.state_dict()`` holds the packed codes under ``weight`` and the quant state
under ``weight.absmax``, ``weight.quant_map``, ``weight.nested_*`` and
``weight.quant_state.bitsandbytes__nf4``. bitsandbytes writes those keys but does not read them back;
:func:`apply_qlora` registers a load hook that rebuilds each layer's quant state from them, so
``load_state_dict`` (and DeepSpeed's ``load_checkpoint``) restores codes and scales together.

Random numbers: peft draws ``A`` from the global torch RNG; building the NF4 layers draws none
(they are constructed on the meta device). So, as for ``lora``, the adapters are identical on every
rank because the trainer seeds every rank the same way before building the model (and DeepSpeed
broadcasts rank 0's parameters at ``initialize`` under ZeRO 0–2); with the same seed ``qlora`` and
``lora`` even start from the same ``A``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import cast

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from falqon_dist.baselines.config import LoraConfig, QloraConfig
from falqon_dist.baselines.lora import inject_lora, lora_targets
from falqon_dist.method.swap import ModuleFilter, swap_linears

#: What to run when bitsandbytes is missing (the ``qlora`` extra pins the tested minimum).
INSTALL_HINT = "`pip install bitsandbytes` (or `pip install -e .[qlora]`)"
#: Elements per NF4 block (one ``absmax`` scale each): bitsandbytes' default, the QLoRA paper's.
BLOCKSIZE = 64


def import_bitsandbytes() -> ModuleType:
    """``bitsandbytes``, imported on first use.

    Raises ``ImportError`` naming ``method=qlora`` and the install command when it is missing or
    fails to import (a native library that does not load raises other exceptions too).
    """
    # On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch an optional inference kernel
    # from the `kernels` hub package and logs a warning on every rank when it cannot; apply_qlora
    # turns that inference path off anyway (see _nf4_linear), so keep the warning out of the logs.
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops_log.level
    cpu_ops_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401  (QuantState, used by the load hook)
    except Exception as exc:  # ImportError, or a broken native library
        raise ImportError(
            f"method=qlora needs bitsandbytes, which does not import here ({type(exc).__name__}: {exc}); "
            f"install it with {INSTALL_HINT}"
        ) from exc
    finally:
        cpu_ops_log.setLevel(level)
    return bitsandbytes


def apply_qlora(
    model: nn.Module,
    config: QloraConfig,
    *,
    device: torch.device | str | None = None,
    module_filter_fn: ModuleFilter | None = None,
    target_modules: Sequence[str] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> list[str]:
    """Quantize the targeted linears of ``model`` to NF4 in place, add LoRA adapters, return the names.

    The targets are the linears ``module_filter_fn(module, fqn)`` accepts (default:
    :func:`~falqon_dist.method.swap.target_module_names`, FALQON's layers), or exactly the fully
    qualified names ``target_modules``, each an ``nn.Linear`` with a floating-point weight. Each is
    replaced by a ``bitsandbytes.nn.Linear4bit`` (NF4, ``compress_statistics = config.double_quant``,
    ``uint8`` storage) quantized on ``device`` — default: where its weight is (CPU included); pass
    the GPU when the model was loaded on the CPU, which quantizes one layer at a time there instead
    of on the CPU (minutes per 7B model) and leaves the NF4 layers on it; the original weight is
    dropped with the replaced module and the bias, if any, is kept frozen. ``compute_dtype``
    defaults to each layer's weight dtype. Then peft LoRA is injected on the same layers (rank,
    alpha (None = rank) and dropout of ``config``) and the adapters are cast to the compute dtype.
    Afterwards only the adapter weights are trainable.

    Raises ``ValueError`` for a bad ``compute_dtype`` or a target that is not a floating-point
    ``nn.Linear`` (checked before anything is modified), ``ImportError`` (with the install command)
    when bitsandbytes does not import.
    """
    if compute_dtype is not None and not (
        isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
    ):
        raise ValueError(
            f"apply_qlora: compute_dtype must be a floating-point torch.dtype, got {compute_dtype!r}"
        )
    names = lora_targets(model, module_filter_fn, target_modules, "apply_qlora")
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear) or not module.weight.is_floating_point():
            kind = type(module).__name__
            if isinstance(module, nn.Linear):
                kind += f" with {module.weight.dtype} weight (already quantized?)"
            raise ValueError(
                f"apply_qlora: target {name!r} is a {kind}; expected an nn.Linear with floating-point weight"
            )
        if module.weight.device.type == "meta":
            raise ValueError(
                f"apply_qlora: target {name!r} is on the meta device; load its weights first"
            )
    bnb = import_bitsandbytes()

    adapter_dtypes: dict[str, torch.dtype] = {}

    def build(name: str, linear: nn.Linear) -> nn.Module:
        layer = _nf4_linear(
            bnb,
            linear,
            double_quant=config.double_quant,
            compute_dtype=compute_dtype,
            device=device,
        )
        adapter_dtypes[name] = cast(torch.dtype, layer.compute_dtype)
        return layer

    swap_linears(model, build, names)  # _nf4_linear quantizes on `device` itself
    # transformers' own 4-bit loader sets this flag; peft reads it to wrap Linear4bit with its
    # bitsandbytes-aware LoRA layer, transformers to count 4-bit parameters in num_parameters().
    model.is_loaded_in_4bit = True  # type: ignore[assignment]
    inject_lora(
        model, LoraConfig(rank=config.rank, alpha=config.alpha, dropout=config.dropout), names
    )
    for name, dtype in adapter_dtypes.items():  # peft leaves them fp32 next to a uint8 weight
        wrapper = model.get_submodule(name)
        cast(nn.Module, wrapper.lora_A).to(dtype)
        cast(nn.Module, wrapper.lora_B).to(dtype)
    return names


@torch.no_grad()
def _nf4_linear(
    bnb: ModuleType,
    linear: nn.Linear,
    *,
    double_quant: bool,
    compute_dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> nn.Module:
    """``linear`` as a frozen NF4 ``Linear4bit`` on ``device`` (default: ``linear``'s; ``linear`` is not modified)."""
    weight = linear.weight
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=False,
        compute_dtype=compute_dtype or weight.dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=torch.uint8,
        device="meta",  # no throw-away float weight, no draw from the global RNG
    )
    layer.weight = bnb.nn.Params4bit(
        weight.detach(),
        requires_grad=False,
        blocksize=BLOCKSIZE,
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=torch.uint8,
        module=layer,
    )
    # bitsandbytes quantizes on this first move
    layer.to(device if device is not None else weight.device)
    if linear.bias is not None:  # shared and frozen when it stays on its device
        layer.bias = (
            linear.bias
            if linear.bias.device == layer.weight.device
            else nn.Parameter(linear.bias.detach().to(layer.weight.device), requires_grad=False)
        )
    # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place at the first eval-mode,
    # no-grad forward into an inference-only layout whose kernel has no autograd: a later training
    # forward then silently stops gradients to the inputs (measured with bitsandbytes 0.50.2).
    # Training alternates evaluation and training, so that path stays off.
    layer.support_avx512bf16_for_cpu = False
    layer.register_load_state_dict_pre_hook(_load_quant_state)
    return layer


def nf4_weight_bytes(weight: torch.Tensor) -> int:
    """Bytes a bitsandbytes 4-bit weight occupies: the packed codes plus every tensor of its quant
    state (block scales, the nested scales of double quantization, the code book)."""

    def tensors(state) -> Iterator[torch.Tensor]:
        for value in vars(state).values():
            if isinstance(value, torch.Tensor) and value.numel() > 0:
                yield value
            elif hasattr(value, "absmax"):  # the nested state of double quantization
                yield from tensors(value)

    nbytes = weight.data.numel() * weight.data.element_size()
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        nbytes += sum(t.numel() * t.element_size() for t in tensors(quant_state))
    return nbytes


class NF4DequantCounter(TorchDispatchMode):
    """Counts bitsandbytes' 4-bit backbone dequantizations while active (benchmarks, tests): the
    fused dequantize + matmul of the forward (``gemm_4bit``) and the explicit ``dequantize_4bit`` of
    the backward (bitsandbytes 0.50 ops; nothing is counted when bitsandbytes is not in use)."""

    OPS = ("bitsandbytes::gemm_4bit", "bitsandbytes::dequantize_4bit")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "bitsandbytes" and func.name() in self.OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _load_quant_state(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook of a ``Linear4bit``: rebuild its quant state from the
    ``weight.*`` entries that ``Linear4bit.state_dict()`` writes (and remove them from the dict);
    ``weight`` itself, the packed codes, is then copied by the ordinary loader."""
    key_prefix = prefix + "weight."
    keys = [key for key in state_dict if key.startswith(key_prefix)]
    if not keys:
        return
    from bitsandbytes.functional import QuantState

    stats = {key[len(key_prefix) :]: state_dict.pop(key) for key in keys}
    weight = cast(torch.Tensor, module.weight)
    quant_state = QuantState.from_dict(stats, device=weight.device)
    weight.quant_state = quant_state  # type: ignore[attr-defined]
    module.quant_state = quant_state  # type: ignore[assignment]
