"""FalqonLinear: a linear layer whose backbone W and LoRA adapter A live in ONE FP8 matrix.

Forward (``x``: N × in, ``M_q = Q([W; A]/s)`` stored as uint8 bits, s fixed):

    x_q = Q(x / s_x)                     E4M3, dynamic tensor-wise s_x
    Y   = (x_q · M_qᵀ) · s_x · s         ONE FP8 GEMM, N × (out + r)
    y   = Y[:, :out] (+ bias)            o_A = Y[:, out:] is kept (in E4M3) for backward

What B holds at a forward depends on the layer's merge recipe (``FalqonConfig.merge``, see
:mod:`falqon_dist.method.config`): with ``paper`` it is zero (the merge zeroes it after each
optimizer step), so the LoRA term ``o_A · Bᵀ`` would add nothing and is not computed; with
``topk_carry`` / ``topk_keep`` the rows a merge does not take stay in B, and ``y += o_A · Bᵀ``; with
``every_row`` (the default) every merge takes every row: B holds at most the carry (what FP8
rounding dropped), which the forward adds and the backward's ∂L/∂x leaves out
(:attr:`FalqonLinear.lora_terms`).

Backward (``g = ∂L/∂y``):

    g_q    = Q(g / s_g)                  E5M2, dynamic tensor-wise s_g
    ∂L/∂x  = (g_q · M_q[:out]) · s_g · s FP8 GEMM over the W rows only
    ∂L/∂B  = (g_qᵀ · Q(o_A)) · s_g · s_o FP8 GEMM, out × r

W and A are frozen inside ``M_q``: they get no gradient.

Operand layouts: the forward GEMM reads ``M_q`` as it is stored (K-major, what FP8 tensor cores
want). ∂L/∂x needs ``W`` column-major, which costs a transposed copy of the W rows per backward pass
unless ``cache_weight_transpose`` keeps one (+1 byte per backbone parameter, its merged columns
rewritten in place by every merge; see :class:`falqon_dist.fp8.TransposedBitsCache`). ∂L/∂B takes
``g_qᵀ`` and ``Q(o_A)ᵀ``, which a backend may write in the same kernel as the casts (``te``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from falqon_dist.fp8 import E4M3, E5M2, TransposedBitsCache, dequantize, from_bits, resolve_backend
from falqon_dist.fp8.cast import SharedCast
from falqon_dist.fp8.module import Float32ScaleMixin
from falqon_dist.method.config import FalqonConfig
from falqon_dist.method.init import adapter_init, meld
from falqon_dist.method.merge_math import MergeStats, RowMerge, adapter_projector
from falqon_dist.method.proxy import merge_slice_, select_rows
from falqon_dist.method.rounding import NEAREST, Rounding

#: One cast of an input tensor shared by the layers that read it in the same forward (q/k/v, gate/up).
#: Benchmarks that feed the very same tensor step after step clear it to time a fresh cast each step.
shared_input_casts = SharedCast()


class _MeldedFP8Matmul(torch.autograd.Function):
    """``y = x Wᵀ (+ o_A·Bᵀ)`` through the melded FP8 GEMM, with ``∂L/∂B`` from the saved adapter output.

    ``lora_forward``: B may be non-zero, so the forward adds ``y += o_A·Bᵀ`` (a bf16 GEMM on the
    GEMM's own o_A output). ``lora_dgrad``: the backward adds its ``∂L/∂x += (g·B)·A`` too (two small
    bf16 GEMMs with A dequantized from the melded rows) — needed when B holds whole unmerged rows,
    not when it holds only the carry (see ``FalqonLinear.lora_terms``). ``∂L/∂B = gᵀ·o_A`` either way.
    """

    @staticmethod
    def forward(
        ctx,
        x_hp,
        proxy,
        qweight,
        scale,
        out_features: int,
        backend_name: str,
        weight_t_cache,
        lora_forward: bool,
        lora_dgrad: bool,
    ):
        backend = resolve_backend(backend_name, x_hp.device)
        x_fp8, x_scale, _ = shared_input_casts.get(
            x_hp,
            (backend.name, E4M3),
            lambda: backend.quantize(x_hp.reshape(-1, x_hp.shape[-1]), E4M3),
        )
        melded_fp8 = from_bits(qweight, E4M3)
        # One rounding to the activation dtype: E4M3 re-quantization of o_A loses far more than bf16.
        # Fast accumulation in the forward only (as torchao): the backward GEMMs promote to fp32.
        y_full = backend.gemm(x_fp8, melded_fp8.t(), x_scale, scale, x_hp.dtype, fast_accum=True)
        adapter_out = y_full[:, out_features:]
        # Only Q(o_A)ᵀ is needed (as the b operand of ∂L/∂B = g_qᵀ · Q(o_A)).
        _, adapter_out_scale, adapter_out_fp8_t = backend.quantize(
            adapter_out, E4M3, transpose=True
        )
        y = y_full[:, :out_features]
        if lora_forward:  # in place, into the GEMM's own output buffer: no copy of y
            y.addmm_(adapter_out, proxy.detach().to(y.dtype).t())
        # qweight (and B) are saved as the Parameters: under ZeRO-3 their data is re-gathered for backward.
        lora_dgrad = lora_dgrad and lora_forward
        ctx.save_for_backward(
            qweight, scale, adapter_out_fp8_t, adapter_out_scale, proxy if lora_dgrad else None
        )
        ctx.out_features, ctx.backend_name, ctx.proxy_dtype = (
            out_features,
            backend_name,
            proxy.dtype,
        )
        ctx.x_shape, ctx.weight_t_cache, ctx.lora_dgrad = x_hp.shape, weight_t_cache, lora_dgrad
        return y.reshape(*x_hp.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out):
        qweight, scale, adapter_out_fp8_t, adapter_out_scale, proxy = ctx.saved_tensors
        backend = resolve_backend(ctx.backend_name, grad_out.device)
        need_x, need_proxy = ctx.needs_input_grad[:2]
        g2d = grad_out.reshape(-1, ctx.out_features)
        g_fp8, g_scale, g_fp8_t = backend.quantize(g2d, E5M2, transpose=need_proxy)
        grad_x = grad_proxy = None
        if need_x:
            weight_bits = qweight[: ctx.out_features]
            # W as a column-major view of the cached row-major Wᵀ
            if ctx.weight_t_cache is not None:
                weight_fp8 = from_bits(ctx.weight_t_cache.get(weight_bits), E4M3).t()
            else:
                weight_fp8 = from_bits(weight_bits, E4M3)
            grad_x = backend.gemm(g_fp8, weight_fp8, g_scale, scale, grad_out.dtype)
            if ctx.lora_dgrad:  # the live LoRA term: ∂(o_A·Bᵀ)/∂x = (g·B)·A
                adapter = dequantize(from_bits(qweight[ctx.out_features :], E4M3), scale, g2d.dtype)
                grad_x = torch.addmm(grad_x, g2d @ proxy.to(g2d.dtype), adapter)
            grad_x = grad_x.reshape(ctx.x_shape)
        if need_proxy:
            grad_proxy = backend.gemm(
                g_fp8_t, adapter_out_fp8_t.t(), g_scale, adapter_out_scale, torch.float32
            )
            grad_proxy = grad_proxy.to(ctx.proxy_dtype)
        return grad_x, grad_proxy, None, None, None, None, None, None, None


class FalqonLinear(Float32ScaleMixin):
    """Drop-in replacement for ``nn.Linear`` trained with FALQON (see module docstring).

    ``FalqonLinear(in_features, out_features, config=FalqonConfig(...))``: the layer keeps its
    :class:`~falqon_dist.method.FalqonConfig` (:attr:`config`) and derives from it everything it does
    (rank, merge recipe, rounding, backend); the read-only properties below (``topk``,
    ``carry_residual``, ``unmerged``, ...) are what the merge glue reads of it.

    State: ``qweight`` (frozen uint8 Parameter, (out + rank, in): E4M3 bits of ``M_q = [W; A]``),
    ``scale`` (float32 buffer, (1,): ``real = fp8 × s``, fixed for the whole run), ``B`` (the only
    trainable Parameter, (out, rank); after a merge it holds zeros, the unmerged rows or the carry,
    see :meth:`remainder`) and a frozen ``bias`` when the original layer had one. With
    ``cache_weight_transpose`` a transposed copy of the W rows is kept outside the state dict
    (``weight_t_cache``), as is A's projector for the carry; whoever writes ``qweight`` bytes
    directly must call :meth:`backbone_changed`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        config: FalqonConfig,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        config.check_layer(in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self._config = config
        self._projector: torch.Tensor | None = (
            None  # A_q's projector, derived from qweight (not state)
        )
        self._adapter_bits: torch.Tensor | None = (
            None  # A's bytes where qweight is partitioned (ZeRO-3)
        )
        self.weight_t_cache = TransposedBitsCache() if config.cache_weight_transpose else None
        self.qweight = nn.Parameter(
            torch.zeros(out_features + config.rank, in_features, dtype=torch.uint8, device=device),
            requires_grad=False,
        )
        self.register_buffer("scale", torch.ones(1, dtype=torch.float32, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, config.rank, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @property
    def config(self) -> FalqonConfig:
        """The layer's :class:`FalqonConfig`; everything below derives from it."""
        return self._config

    @config.setter
    def config(self, config: FalqonConfig) -> None:
        """Change how the next merges run (``merge``, ``topk``, ``merge_rounding``, ``merge_every``,
        ``backend``, ``seed``); what shaped the layer's state (``rank``, ``cache_weight_transpose``)
        cannot change."""
        for field in ("rank", "cache_weight_transpose"):
            if getattr(config, field) != getattr(self._config, field):
                raise ValueError(
                    f"FalqonLinear.config: {field} shapes the layer's state and cannot change "
                    f"({getattr(self._config, field)!r} -> {getattr(config, field)!r})"
                )
        config.check_layer(self.in_features, self.out_features)
        self._config = config

    @classmethod
    def shaped_like(cls, linear: nn.Linear, config: FalqonConfig) -> FalqonLinear:
        """An uninitialized FALQON layer with ``linear``'s shape, bias, device and dtype (for loading)."""
        weight = linear.weight
        return cls(
            linear.in_features,
            linear.out_features,
            config=config,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype if weight.is_floating_point() else torch.float32,
        )

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, config: FalqonConfig) -> FalqonLinear:
        """Build a FALQON layer from ``linear`` (its weight is read, never modified)."""
        weight = linear.weight
        layer = cls.shaped_like(linear, config)
        generator = torch.Generator().manual_seed(config.seed)
        adapter = adapter_init(weight, config.rank, config.init, generator)
        bits, scale = meld(weight, adapter, headroom=config.scale_headroom)
        layer.qweight.copy_(bits)
        layer.scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    # What the layer's config fixes, read by the merge glue (falqon_dist.distributed, the export).
    @property
    def rank(self) -> int:
        return self._config.rank

    @property
    def backend(self) -> str:
        return self._config.backend

    @property
    def merge(self) -> str:
        """The merge recipe (:data:`~falqon_dist.method.config.MERGE_RECIPES`)."""
        return self._config.merge

    @property
    def topk(self) -> int | None:
        """``config.topk``: rows per top-k merge (None = rank; always None with ``merge="every_row"``)."""
        return self._config.topk

    @property
    def merge_rounding(self) -> str:
        return self._config.merge_rounding

    @property
    def merge_every(self) -> int:
        return self._config.merge_every

    @property
    def seed(self) -> int:
        return self._config.seed

    @property
    def merges_every_row(self) -> bool:
        """``merge="every_row"``: every merge takes every row, so B never holds more than the carry."""
        return not self._config.recipe.top_k

    @property
    def unmerged(self) -> str:
        """What a merge does with the rows of B it does not take: ``"keep"`` (they stay in B:
        ``topk_carry``, ``topk_keep``; ``every_row`` takes every row, so B holds only the carry) or
        ``"discard"`` (B is zeroed: ``paper``)."""
        return "keep" if self._config.recipe.keeps_unmerged else "discard"

    @property
    def carry_residual(self) -> bool:
        """Whether a merge puts what rounding dropped back into B (``every_row``, ``topk_carry``)."""
        return self._config.recipe.carries

    @property
    def rows_per_merge(self) -> int:
        """k of the row-wise top-k: ``topk``, or ``rank`` when unset (the authors' behaviour);
        ``out_features`` for ``every_row``."""
        return self.out_features if self.merges_every_row else self.topk or self.rank

    @property
    def lora_terms(self) -> tuple[bool, bool]:
        """Whether the forward adds ``o_A·Bᵀ`` and whether the backward adds its ``(g·B)·A``.

        * ``paper``: B is zero after every merge — neither.
        * ``topk_carry``, ``topk_keep``: B holds whole rows no merge took yet — both, as LoRA.
        * ``every_row``: B holds only the carry C, what FP8 rounding dropped (each element of C·A
          below one FP8 step of W). The forward adds it, so the layer computes the unrounded
          ``W_q + C·A`` within A's row space (what the benchmark's real-text task needs); the
          backward leaves it out of ``∂L/∂x``, where it is smaller than the FP8 rounding of W that
          GEMM already carries. One small GEMM over the paper's layer.
        * ``merge_every > 1``: between merges B holds the updates of the steps since the last one,
          whatever the merge — both, as LoRA.
        """
        if self.merge_every > 1:
            return True, True
        recipe = self._config.recipe
        if not recipe.top_k:
            return True, False
        return recipe.keeps_unmerged, recipe.keeps_unmerged

    def merge_due(self, step: int) -> bool:
        """Whether the merge after optimizer step ``step`` (1, 2, …) runs: every ``merge_every``-th."""
        return step % self.merge_every == 0

    def rows_to_merge(self, proxy: torch.Tensor) -> torch.Tensor | None:
        """The rows the next merge takes: the top-k of ``proxy`` (sorted), or None for every row."""
        return None if self.merges_every_row else select_rows(proxy, self.rows_per_merge)

    def backbone_weight(self) -> torch.Tensor:
        """The dequantized W rows, float32 (out, in)."""
        return dequantize(from_bits(self.qweight, E4M3)[: self.out_features], self.scale)

    def adapter_weight(self) -> torch.Tensor:
        """The dequantized A rows, float32 (rank, in)."""
        return dequantize(from_bits(self.qweight, E4M3)[self.out_features :], self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _MeldedFP8Matmul.apply(
            x,
            self.B,
            self.qweight,
            self.scale,
            self.out_features,
            self.backend,
            self.weight_t_cache,
            *self.lora_terms,
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    @torch.no_grad()
    def merge_proxy_(
        self, proxy: torch.Tensor | None = None, *, step: int = 0, rows: torch.Tensor | None = None
    ) -> MergeStats:
        """Merge the top-k rows of B (every row with ``merge="every_row"``) into the FP8 backbone, then
        reset B (see :mod:`falqon_dist.method.proxy`).

        ``proxy`` overrides the B that is read (e.g. an optimizer's fp32 master copy); resetting that
        copy to :meth:`remainder` is then the caller's job, ``self.B`` is reset here in any case.
        ``rows`` overrides the top-k choice. ``step`` (the optimizer step) keys stochastic merge
        rounding; nearest rounding ignores it. No host synchronization: the returned
        :class:`~falqon_dist.method.proxy.MergeStats` holds device tensors.
        """
        proxy = (self.B if proxy is None else proxy).detach()
        rows = self.rows_to_merge(proxy) if rows is None else rows
        merge = self.merge_rows_(proxy, rows, step=step)
        self.B.copy_(self.remainder(proxy, rows, merge.carry))
        return merge.stats

    @torch.no_grad()
    def fold_(self, proxy: torch.Tensor | None = None) -> MergeStats:
        """Fold what B still holds (a carry, unmerged rows, updates since the last merge) into the
        FP8 backbone as far as FP8 allows, and zero B: the layer then computes exactly what an FP8
        export of it holds (no LoRA term left).

        Every row, nearest rounding (deterministic: the trainer's final fold and an export of the same
        checkpoint write the same bytes), nothing carried: what rounding drops here, each element
        below half an FP8 step, has no FP8 representation. ``proxy`` as in :meth:`merge_proxy_`.
        """
        proxy = (self.B if proxy is None else proxy).detach()
        merge = self.merge_rows_(proxy, None, fold=True)
        self.B.zero_()
        return merge.stats

    @torch.no_grad()
    def merge_rows_(
        self, proxy: torch.Tensor, rows: torch.Tensor | None, *, step: int = 0, fold: bool = False
    ) -> RowMerge:
        """Write rows ``rows`` of ``proxy`` (B or its master; None = every row) into the backbone;
        B is not touched.

        Returns the statistics, the new bits and, for a recipe that carries, the carry that
        :meth:`remainder` puts back into B. A cached ``Wᵀ`` is updated in place (only the merged rows,
        i.e. its columns, change). ``fold``: the final merge of :meth:`fold_` (nearest, no carry).
        """
        proxy = proxy.detach().float()
        adapter_q = self.adapter_q()
        merge = merge_slice_(
            self.qweight.data,
            0,
            proxy,
            rows,
            adapter_q,
            self.merge_rounding_at(step, fold),
            projector=self.adapter_projector(adapter_q)
            if self.carry_residual and not fold
            else None,
        )
        self.rows_rewritten(rows, merge.bits)
        return merge

    def rounding(self, step: int) -> Rounding:
        """How this layer's merge at optimizer ``step`` rounds (its noise keyed by seed and step)."""
        return Rounding(stochastic=self.merge_rounding == "stochastic", seed=self.seed, step=step)

    def merge_rounding_at(self, step: int, fold: bool = False) -> Rounding:
        """:meth:`rounding`, or nearest for the final fold (:meth:`fold_`)."""
        return NEAREST if fold else self.rounding(step)

    def remainder(
        self, proxy: torch.Tensor, rows: torch.Tensor | None, carry: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What B holds after merging ``rows`` of ``proxy`` (None = every row): zeros (``paper``, or
        every row merged without a carry: the final fold), ``proxy`` with the merged rows zeroed
        (``topk_keep``) or set to ``carry``, what rounding dropped from them (``topk_carry``,
        ``every_row``). A row holding NaN/inf is zeroed whatever the recipe: the merge never
        wrote it into the backbone, and it must not poison the next forward."""
        # every row merged: the carry alone, finite by construction (zero where the sum was not)
        if rows is None:
            return (
                torch.zeros_like(proxy)
                if carry is None
                else carry.to(device=proxy.device, dtype=proxy.dtype)
            )
        if not self._config.recipe.keeps_unmerged:
            return torch.zeros_like(proxy)
        if carry is None:
            kept = proxy.index_fill(0, rows.to(proxy.device), 0)
        else:
            kept = proxy.index_copy(
                0, rows.to(proxy.device), carry.to(device=proxy.device, dtype=proxy.dtype)
            )
        return torch.where(torch.isfinite(kept).all(dim=1, keepdim=True), kept, 0.0)

    def adapter_projector(self, adapter_q: torch.Tensor | None = None) -> torch.Tensor:
        """A_q's least-squares projector ``P`` (in × r, see :func:`~falqon_dist.method.proxy.adapter_projector`),
        computed once: A is frozen. ``adapter_q`` supplies A_q where this rank does not hold it whole
        (ZeRO-3). Dropped by :meth:`backbone_changed`."""
        adapter_q = self.adapter_q() if adapter_q is None else adapter_q
        if self._projector is None or self._projector.device != adapter_q.device:
            self._projector = adapter_projector(adapter_q)
        return self._projector

    def adapter_q(self, gather: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """The adapter rows ``A_q = M_q[out:]`` as float32 in the scaled FP8 domain (rank × in).

        ``gather`` returns A's bytes (rank × in, uint8) where this rank does not hold them (a
        ZeRO-3 partition); it is called once and the bytes are kept (r·in bytes: A is frozen),
        so later merges gather nothing. Dropped by :meth:`backbone_changed`.
        """
        if gather is None:
            return from_bits(self.qweight, E4M3)[self.out_features :].float()
        if self._adapter_bits is None:
            self._adapter_bits = gather()
        return from_bits(self._adapter_bits, E4M3).float()

    def rows_rewritten(self, rows: torch.Tensor | None, new_bits: torch.Tensor) -> None:
        """Rows ``rows`` of W (None = all) now hold ``new_bits``: refresh the cached ``Wᵀ`` in place."""
        if self.weight_t_cache is not None:
            if rows is None:
                rows = torch.arange(self.out_features, device=new_bits.device)
            self.weight_t_cache.update_rows_(rows, new_bits)

    def backbone_changed(self) -> None:
        """Drop state derived from the ``qweight`` bytes (the transposed W cache, A's projector)
        after they changed."""
        self._projector = self._adapter_bits = None
        if self.weight_t_cache is not None:
            self.weight_t_cache.invalidate()

    def _load_from_state_dict(self, *args, **kwargs):
        self.backbone_changed()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, merge={self.merge}"
            + ("" if self.merges_every_row else f", topk={self.rows_per_merge}")
            + f", backend={self.backend}"
            + (", cache_weight_transpose=True" if self.weight_t_cache is not None else "")
            + (", merge_rounding=stochastic" if self.merge_rounding == "stochastic" else "")
            + (f", merge_every={self.merge_every}" if self.merge_every > 1 else "")
        )
