"""FP8 LoRA with a separate adapter path — the torchao-style baseline FALQON is measured against.

The backbone ``W`` is stored once as E4M3 bits with a fixed tensor-wise scale ``s_w`` (frozen, like
FALQON's ``M_q`` but without the adapter rows). The adapter ``A ∈ R^{r×in}`` (kaiming-uniform) and
``B ∈ R^{out×r}`` (zeros) are trainable high-precision parameters, re-quantized to E4M3 on every
forward. With ``c = α/r`` and ``Q`` a dynamic tensor-wise quantization (scale ``s = amax/F``):

Forward (``x``: N × in)::

    x_q, s_x = Q₄(x)      A_q, s_A = Q₄(A)      B_q, s_B = Q₄(B)          E4M3
    h        = (x_q · A_qᵀ) · s_x · s_A                                 N × r
    h_q, s_h = Q₄(h)                                                    E4M3
    y        = (x_q · W_qᵀ) · s_x · s_w  +  c · (h_q · B_qᵀ) · s_h · s_B  (+ bias)

Backward (``g = ∂L/∂y``)::

    g_q, s_g   = Q₅(g)                                                  E5M2
    ∂L/∂B      = c · (g_qᵀ · h_q) · s_g · s_h                            out × r
    ∂L/∂h      = c · (g_q · B_q) · s_g · s_B                             N × r
    gh_q, s_gh = Q₅(∂L/∂h)                                              E5M2
    ∂L/∂A      = (gh_qᵀ · x_q) · s_gh · s_x                              r × in
    ∂L/∂x      = (g_q · W_q) · s_g · s_w  +  (gh_q · A_q) · s_gh · s_A     N × in

Every product is an FP8 GEMM through :func:`falqon_dist.fp8.resolve_backend`, accumulated in
float32. The two backbone GEMMs (N × out × in and N × in × out) write the input dtype directly, as
torchao's ``Float8Linear`` and FALQON's ∂L/∂x do (on the emulated CPU backend a float32 output would
turn them into float32 matmuls, about 2× slower); the adapter terms are formed in float32 and added
into them in place. ``h``, ``∂L/∂h``, ``∂L/∂A`` and ``∂L/∂B`` are float32 before their casts.
``W`` gets no gradient.

Cost against FALQON (per layer, per forward + backward): :data:`QUANTIZE_OPS_PER_STEP` = 6 dynamic
quantizations (x, A, B, h, g, ∂L/∂h) against FALQON's 3 (x, g, o_A), and 8 GEMMs against 3. Both
run the two backbone-size GEMMs (y and ∂L/∂x; FALQON's forward is r columns wider because ``x Aᵀ``
is folded into it); FP8 LoRA adds ``x Aᵀ`` and ``h Bᵀ`` in forward and ∂L/∂h, ∂L/∂A and the
adapter's share of ∂L/∂x in backward, where FALQON has only ∂L/∂B. ``x_q`` is kept for ``∂L/∂A``
(N × in bytes per layer); FALQON keeps only ``o_A`` (N × r). The activation cast is shared by the two paths here; a
literal composition of three torchao ``Float8Linear`` modules (base, lora_A, lora_B) would cast
``x`` and ``g`` twice each and re-cast a high-precision ``W`` every step: 9 casts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from falqon_dist.baselines.config import Fp8LoraConfig
from falqon_dist.fp8 import (
    E4M3,
    E5M2,
    dequantize,
    from_bits,
    quantize_dynamic,
    resolve_backend,
    to_bits,
)
from falqon_dist.fp8.module import Float32ScaleMixin
from falqon_dist.method.swap import ModuleFilter, swap_linears, target_module_names

#: Dynamic quantizations per layer per forward + backward: x, A, B, h (forward), g, ∂L/∂h (backward).
QUANTIZE_OPS_PER_STEP = 6


class _Fp8LoraMatmul(torch.autograd.Function):
    """``y = x Wᵀ + c·(x Aᵀ) Bᵀ`` with every GEMM in FP8 (see module docstring)."""

    @staticmethod
    def forward(ctx, x_hp, lora_a_hp, lora_b_hp, qweight, scale, scaling: float, backend_name: str):
        backend = resolve_backend(backend_name, x_hp.device)
        out_features = qweight.shape[0]
        x2d = x_hp.reshape(-1, x_hp.shape[-1])
        x_fp8, x_scale, _ = backend.quantize(x2d, E4M3)
        a_fp8, a_scale, _ = backend.quantize(lora_a_hp, E4M3)
        b_fp8, b_scale, _ = backend.quantize(lora_b_hp, E4M3)
        weight_fp8 = from_bits(qweight, E4M3)
        h = backend.gemm(x_fp8, a_fp8.t(), x_scale, a_scale, torch.float32)
        h_fp8, h_scale, _ = backend.quantize(h, E4M3)
        y = backend.gemm(x_fp8, weight_fp8.t(), x_scale, scale, x_hp.dtype)
        # adapter term added in fp32
        y += backend.gemm(h_fp8, b_fp8.t(), h_scale, b_scale * scaling, torch.float32)
        # qweight is saved as the Parameter itself: under ZeRO-3 its data is re-gathered for backward.
        ctx.save_for_backward(
            x_fp8, x_scale, a_fp8, a_scale, b_fp8, b_scale, h_fp8, h_scale, qweight, scale
        )
        ctx.scaling, ctx.backend_name, ctx.x_shape = scaling, backend_name, x_hp.shape
        ctx.param_dtypes = (lora_a_hp.dtype, lora_b_hp.dtype)
        return y.reshape(*x_hp.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out):
        x_fp8, x_scale, a_fp8, a_scale, b_fp8, b_scale, h_fp8, h_scale, qweight, scale = (
            ctx.saved_tensors
        )
        backend = resolve_backend(ctx.backend_name, grad_out.device)
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        g_fp8, g_scale, _ = backend.quantize(grad_out.reshape(-1, qweight.shape[0]), E5M2)
        g_scale_lora = g_scale * ctx.scaling  # ∂L/∂(h_q B_qᵀ) = c·g
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = backend.gemm(g_fp8.t(), h_fp8, g_scale_lora, h_scale, torch.float32).to(
                ctx.param_dtypes[1]
            )
        if need_x or need_a:
            grad_h = backend.gemm(g_fp8, b_fp8, g_scale_lora, b_scale, torch.float32)
            gh_fp8, gh_scale, _ = backend.quantize(grad_h, E5M2)
            if need_a:
                grad_a = backend.gemm(gh_fp8.t(), x_fp8, gh_scale, x_scale, torch.float32).to(
                    ctx.param_dtypes[0]
                )
            if need_x:
                grad_x = backend.gemm(
                    g_fp8, from_bits(qweight, E4M3), g_scale, scale, grad_out.dtype
                )
                grad_x += backend.gemm(gh_fp8, a_fp8, gh_scale, a_scale, torch.float32)
                grad_x = grad_x.reshape(ctx.x_shape)
        return grad_x, grad_a, grad_b, None, None, None, None


class Fp8LoraLinear(Float32ScaleMixin):
    """Drop-in replacement for ``nn.Linear``: frozen FP8 backbone + FP8-GEMM LoRA adapter.

    State: ``qweight`` (frozen uint8 Parameter, (out, in): E4M3 bits of ``Q(W/s_w)``), ``scale``
    (float32 buffer (1,), ``W ≈ fp8 × s_w``, fixed), ``lora_A`` (r, in) and ``lora_B`` (out, r): the
    only trainable parameters, and a frozen ``bias`` when the original layer had one.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        alpha: float | None = None,
        bias: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        self.backend = backend
        self.qweight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=torch.uint8, device=device),
            requires_grad=False,
        )
        self.register_buffer("scale", torch.ones(1, dtype=torch.float32, device=device))
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """``A`` kaiming-uniform (a = √5, as peft and ``nn.Linear``), ``B = 0``: the layer starts as ``W``."""
        # Drawn on the CPU in float32 (a seeded CPU generator cannot fill a CUDA tensor), then copied.
        adapter_init = torch.empty(self.lora_A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(adapter_init, a=math.sqrt(5), generator=generator)
        self.lora_A.copy_(adapter_init)
        self.lora_B.zero_()

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int,
        alpha: float | None = None,
        backend: str = "auto",
        generator: torch.Generator | None = None,
    ) -> Fp8LoraLinear:
        """Build from ``linear`` (read, never modified): ``s_w = amax(W)/448``, ``W_q = Q(W/s_w)``."""
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            alpha=alpha,
            bias=linear.bias is not None,
            backend=backend,
            device=weight.device,
            dtype=weight.dtype if weight.is_floating_point() else torch.float32,
        )
        weight_fp8, weight_scale = quantize_dynamic(weight, E4M3)
        layer.qweight.copy_(to_bits(weight_fp8))
        layer.scale.copy_(weight_scale)
        layer.reset_adapter(generator)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def backbone_weight(self) -> torch.Tensor:
        """The dequantized backbone ``W_q · s_w``, float32 (out, in)."""
        return dequantize(from_bits(self.qweight, E4M3), self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Fp8LoraMatmul.apply(
            x, self.lora_A, self.lora_B, self.qweight, self.scale, self.scaling, self.backend
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha:g}, bias={self.bias is not None}, backend={self.backend}"
        )


def convert_fp8_lora(
    model: nn.Module,
    config: Fp8LoraConfig,
    *,
    device: torch.device | str | None = None,
    module_filter_fn: ModuleFilter | None = None,
    seed: int = 0,
) -> list[str]:
    """Swap eligible linears of ``model`` in place for :class:`Fp8LoraLinear`; freeze everything else.

    Eligible layers are FALQON's (:func:`~falqon_dist.method.swap.target_module_names`, or
    ``module_filter_fn(module, fqn)``). ``config`` gives the rank, alpha (None = rank: scaling 1)
    and FP8 backend. Every ``A`` is drawn from one generator seeded with ``seed`` in module order, so
    every rank builds the same bytes. ``device`` moves each linear there just before it is converted
    (default: stay put). Afterwards ``lora_A`` / ``lora_B`` are the only trainable parameters.
    Returns the names.
    """
    generator = torch.Generator().manual_seed(seed)

    def build(name: str, linear: nn.Linear) -> nn.Module:
        return Fp8LoraLinear.from_linear(
            linear,
            rank=config.rank,
            alpha=config.alpha,
            backend=config.backend,
            generator=generator,
        )

    return swap_linears(model, build, target_module_names(model, module_filter_fn), device=device)
