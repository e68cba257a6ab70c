"""FalqonLinear: a linear layer whose backbone W and LoRA adapter A live in ONE FP8 matrix.

Forward (``x``: N × in, ``M_q = Q([W; A]/s)`` stored as uint8 bits, s fixed):

    x_q = Q(x / s_x)                     E4M3, dynamic tensor-wise s_x
    Y   = (x_q · M_qᵀ) · s_x · s         ONE FP8 GEMM, N × (out + r)
    y   = Y[:, :out] (+ bias)            o_A = Y[:, out:] is kept (in E4M3) for backward

With the paper's merge (``unmerged="discard"``) B is zero at every forward (the merge zeroes it after
each optimizer step), so the LoRA term ``o_A · Bᵀ`` would add nothing and is not computed. With
``unmerged="keep"`` the rows a merge does not take stay in B, and ``y += o_A · Bᵀ``. With
``topk="all"`` every merge takes every row: B holds at most the carry (what FP8 rounding dropped),
which the forward adds and the backward's ∂L/∂x leaves out (:attr:`FalqonLinear.lora_terms`).

Backward (``g = ∂L/∂y``):

    g_q    = Q(g / s_g)                  E5M2, dynamic tensor-wise s_g
    ∂L/∂x  = (g_q · M_q[:out]) · s_g · s FP8 GEMM over the W rows only
    ∂L/∂B  = (g_qᵀ · Q(o_A)) · s_g · s_o FP8 GEMM, out × r

W and A are frozen inside ``M_q``: they get no gradient.

Operand layouts: the forward GEMM reads ``M_q`` as it is stored (K-major, what FP8 tensor cores
want). ∂L/∂x needs ``W`` column-major, which costs a transposed copy of the W rows per backward pass
unless ``cache_weight_transpose`` keeps one (+1 byte per backbone parameter, its merged columns
rewritten in place by every merge; see :class:`falqon_dist.fp8.TransposedBitsCache`). ∂L/∂B takes ``g_qᵀ`` and ``Q(o_A)ᵀ``, which a
backend may write in the same kernel as the casts (``te``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from falqon_dist.fp8 import E4M3, E5M2, TransposedBitsCache, dequantize, from_bits, resolve_backend
from falqon_dist.fp8.cast import SharedCast
from falqon_dist.fp8.module import Float32ScaleMixin
from falqon_dist.method.config import STOCHASTIC_WITH_CARRY, FalqonConfig, carry_is_live
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
        ctx, x_hp, proxy, qweight, scale, out_features: int, backend_name: str, weight_t_cache, lora_forward: bool,
        lora_dgrad: bool,
    ):
        backend = resolve_backend(backend_name, x_hp.device)
        x_fp8, x_scale, _ = shared_input_casts.get(
            x_hp, (backend.name, E4M3), lambda: backend.quantize(x_hp.reshape(-1, x_hp.shape[-1]), E4M3)
        )
        melded_fp8 = from_bits(qweight, E4M3)
        # One rounding to the activation dtype: E4M3 re-quantization of o_A loses far more than bf16.
        # Fast accumulation in the forward only (as torchao): the backward GEMMs promote to fp32.
        y_full = backend.gemm(x_fp8, melded_fp8.t(), x_scale, scale, x_hp.dtype, fast_accum=True)
        adapter_out = y_full[:, out_features:]
        # Only Q(o_A)ᵀ is needed (as the b operand of ∂L/∂B = g_qᵀ · Q(o_A)).
        _, adapter_out_scale, adapter_out_fp8_t = backend.quantize(adapter_out, E4M3, transpose=True)
        y = y_full[:, :out_features]
        if lora_forward:  # in place, into the GEMM's own output buffer: no copy of y
            y.addmm_(adapter_out, proxy.detach().to(y.dtype).t())
        # qweight (and B) are saved as the Parameters: under ZeRO-3 their data is re-gathered for backward.
        lora_dgrad = lora_dgrad and lora_forward
        ctx.save_for_backward(qweight, scale, adapter_out_fp8_t, adapter_out_scale, proxy if lora_dgrad else None)
        ctx.out_features, ctx.backend_name, ctx.proxy_dtype = out_features, backend_name, proxy.dtype
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
            if ctx.weight_t_cache is not None:  # W as a column-major view of the cached row-major Wᵀ
                weight_fp8 = from_bits(ctx.weight_t_cache.get(weight_bits), E4M3).t()
            else:
                weight_fp8 = from_bits(weight_bits, E4M3)
            grad_x = backend.gemm(g_fp8, weight_fp8, g_scale, scale, grad_out.dtype)
            if ctx.lora_dgrad:  # the live LoRA term: ∂(o_A·Bᵀ)/∂x = (g·B)·A
                adapter = dequantize(from_bits(qweight[ctx.out_features :], E4M3), scale, g2d.dtype)
                grad_x = torch.addmm(grad_x, g2d @ proxy.to(g2d.dtype), adapter)
            grad_x = grad_x.reshape(ctx.x_shape)
        if need_proxy:
            grad_proxy = backend.gemm(g_fp8_t, adapter_out_fp8_t.t(), g_scale, adapter_out_scale, torch.float32)
            grad_proxy = grad_proxy.to(ctx.proxy_dtype)
        return grad_x, grad_proxy, None, None, None, None, None, None, None


class FalqonLinear(Float32ScaleMixin):
    """Drop-in replacement for ``nn.Linear`` trained with FALQON (see module docstring).

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
        rank: int,
        *,
        bias: bool = False,
        backend: str = "auto",
        topk: int | str | None = None,
        cache_weight_transpose: bool = False,
        merge_rounding: str = "nearest",
        unmerged: str = "keep",
        carry_residual: bool = False,
        merge_every: int = 1,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if topk is not None and topk != "all" and not (isinstance(topk, int) and 1 <= topk <= out_features):
            raise ValueError(f"topk must be None, 'all' or in 1..out_features={out_features}, got {topk!r}")
        if rank > min(in_features, out_features):
            raise ValueError(
                f"rank {rank} exceeds min(in_features, out_features) = {min(in_features, out_features)}"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.backend, self.topk = backend, topk
        self.merge_rounding, self.seed = merge_rounding, seed
        self.unmerged, self.merge_every = unmerged, merge_every
        # the paper's merge (discard, top-k) zeroes all of B: there is nothing to carry back
        self.carry_residual = carry_is_live(topk, unmerged, carry_residual)
        if self.carry_residual and merge_rounding == "stochastic":
            raise ValueError(f"merge_rounding {STOCHASTIC_WITH_CARRY}")
        self._projector: torch.Tensor | None = None  # A_q's projector, derived from qweight (not state)
        self._adapter_bits: torch.Tensor | None = None  # A's bytes where qweight is partitioned (ZeRO-3)
        self.weight_t_cache = TransposedBitsCache() if cache_weight_transpose else None
        self.qweight = nn.Parameter(
            torch.zeros(out_features + rank, in_features, dtype=torch.uint8, device=device), requires_grad=False
        )
        self.register_buffer("scale", torch.ones(1, dtype=torch.float32, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def shaped_like(cls, linear: nn.Linear, config: FalqonConfig) -> FalqonLinear:
        """An uninitialized FALQON layer with ``linear``'s shape, bias, device and dtype (for loading)."""
        weight = linear.weight
        return cls(
            linear.in_features,
            linear.out_features,
            config.rank,
            bias=linear.bias is not None,
            backend=config.backend,
            topk=config.topk,
            cache_weight_transpose=config.cache_weight_transpose,
            merge_rounding=config.merge_rounding,
            unmerged=config.unmerged,
            carry_residual=config.carry_residual,
            merge_every=config.merge_every,
            seed=config.seed,
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

    @property
    def merges_every_row(self) -> bool:
        """``topk="all"``: every merge takes every row, so B never holds more than the carry."""
        return self.topk == "all"

    @property
    def rows_per_merge(self) -> int:
        """k of the row-wise top-k: ``topk``, ``out_features`` for ``"all"``, or ``rank`` when unset
        (the authors' behaviour)."""
        return self.out_features if self.merges_every_row else self.topk or self.rank

    @property
    def lora_terms(self) -> tuple[bool, bool]:
        """Whether the forward adds ``o_A·Bᵀ`` and whether the backward adds its ``(g·B)·A``.

        * the paper's merge: B is zero after every merge — neither.
        * ``unmerged="keep"`` with top-k: B holds whole rows no merge took yet — both, as LoRA.
        * ``topk="all"`` with ``carry_residual``: B holds only the carry C, what FP8 rounding dropped
          (each element of C·A below one FP8 step of W). The forward adds it, so the layer computes
          the unrounded ``W_q + C·A`` within A's row space (what the benchmark's real-text task
          needs); the backward leaves it out of ``∂L/∂x``, where it is smaller than the FP8
          rounding of W that GEMM already carries. One small GEMM over the paper's layer.
        * ``topk="all"`` without the carry: B is zero after every merge — neither.
        * ``merge_every > 1``: between merges B holds the updates of the steps since the last one,
          whatever the merge — both, as LoRA.
        """
        if self.merge_every > 1:
            return True, True
        if self.merges_every_row:
            return self.carry_residual, False
        keep = self.unmerged == "keep"
        return keep, keep

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
            x, self.B, self.qweight, self.scale, self.out_features, self.backend, self.weight_t_cache,
            *self.lora_terms,
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    @torch.no_grad()
    def merge_proxy_(
        self, proxy: torch.Tensor | None = None, *, step: int = 0, rows: torch.Tensor | None = None
    ) -> MergeStats:
        """Merge the top-k rows of B (every row with ``topk="all"``) into the FP8 backbone, then
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

        Returns the statistics, the new bits and, with ``carry_residual``, the carry that
        :meth:`remainder` puts back into B. A cached ``Wᵀ`` is updated in place (only the merged rows,
        i.e. its columns, change). ``fold``: the final merge of :meth:`fold_` (nearest, no carry).
        """
        proxy = proxy.detach().float()
        adapter_q = self.adapter_q()
        merge = merge_slice_(
            self.qweight.data, 0, proxy, rows, adapter_q, self.merge_rounding_at(step, fold),
            projector=self.adapter_projector(adapter_q) if self.carry_residual and not fold else None,
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
        """What B holds after merging ``rows`` of ``proxy`` (None = every row): zeros (the paper's
        ``unmerged="discard"``), or ``proxy`` with the merged rows zeroed (``unmerged="keep"``), or
        set to ``carry``, what rounding dropped from them (``carry_residual``). A row holding NaN/inf
        is zeroed whatever the mode: the merge never wrote it into the backbone, and it must not
        poison the next forward."""
        if (self.unmerged != "keep" and rows is not None) or (rows is None and carry is None):
            return torch.zeros_like(proxy)
        if rows is None:  # the carry alone: finite by construction (zero where the sum was not)
            return carry.to(device=proxy.device, dtype=proxy.dtype)
        if carry is None:
            kept = proxy.index_fill(0, rows.to(proxy.device), 0)
        else:
            kept = proxy.index_copy(0, rows.to(proxy.device), carry.to(device=proxy.device, dtype=proxy.dtype))
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
            f"bias={self.bias is not None}, topk={'all' if self.merges_every_row else self.rows_per_merge}, "
            f"backend={self.backend}"
            + (", cache_weight_transpose=True" if self.weight_t_cache is not None else "")
            + (", merge_rounding=stochastic" if self.merge_rounding == "stochastic" else "")
            + (", unmerged=discard" if self.unmerged == "discard" else "")
            + (", carry_residual=True" if self.carry_residual else "")
            + (f", merge_every={self.merge_every}" if self.merge_every > 1 else "")
        )
