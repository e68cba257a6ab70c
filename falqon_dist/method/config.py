"""FALQON layer configuration."""

from __future__ import annotations

from dataclasses import dataclass

from falqon_dist.config_checks import InvalidField, check_bool, check_choice, check_int, check_positive_int, is_int
from falqon_dist.fp8.backends import BACKEND_NAMES

INIT_NAMES = ("svd", "random")
MERGE_ROUNDINGS = ("nearest", "stochastic")
UNMERGED = ("discard", "keep")


#: Why ``merge_rounding="stochastic"`` and a live carry are refused together.
STOCHASTIC_WITH_CARRY = (
    "cannot be 'stochastic' while carry_residual=True carries what rounding drops: the carry would feed "
    "the rounding noise back into the next merge, so the bytes random-walk even when B receives no "
    "update (about 29% of the weight's norm after 1,000 merges, outside A's row space). Stochastic "
    "rounding is unbiased on its own: use merge_rounding='stochastic' with carry_residual=False, or "
    "keep the default merge_rounding='nearest' with the carry"
)


def carry_is_live(topk: int | str | None, unmerged: str, carry_residual: bool) -> bool:
    """Whether a merge puts what rounding dropped back into B: ``carry_residual`` with every-row
    merges or ``unmerged="keep"`` (the paper's merge zeroes all of B: nothing to carry back)."""
    return carry_residual and (unmerged == "keep" or topk == "all")


@dataclass(frozen=True)
class FalqonConfig:
    """How linear layers are converted to FALQON layers.

    Every field is validated on construction; a bad value raises
    :class:`~falqon_dist.config_checks.InvalidField` (a ``ValueError``) naming the field and what
    would be valid.
    """

    #: LoRA rank r: A is (r, in) melded under the backbone rows, B is (out, r).
    rank: int = 64
    #: Rows of W updated per proxy merge (row-wise top-k of Σ_k |B_jk|). "all" (the default) = every
    #: row at every merge: nothing waits in B, which then holds only the carry; the forward adds
    #: its LoRA term (one small GEMM), the backward runs the paper's GEMMs, ``unmerged`` is moot
    #: (benchmarks/bench_learning.py; README). None = rank, which is what the authors' code does.
    topk: int | str | None = "all"
    #: How A is initialized: "svd" (top-r SVD of the backbone's FP8 quantization error) or "random"
    #: (N(mean W, std W) clipped to [min W, max W]).
    init: str = "svd"
    #: FP8 GEMM backend: "auto" | "emulated" | "scaled_mm" | "te" (see falqon_dist.fp8.backends).
    backend: str = "auto"
    #: How merged weights are rounded back to E4M3: "nearest" (the paper) or "stochastic" (unbiased:
    #: an update below half an FP8 step still moves the weight on average; seeded by ``seed`` and the
    #: optimizer step, so every rank draws the same noise). "stochastic" needs ``carry_residual=False``
    #: wherever the carry would be live (see :data:`STOCHASTIC_WITH_CARRY`).
    merge_rounding: str = "nearest"
    #: With a top-k merge, what happens to the rows of B a merge does not take: "keep" (only merged
    #: rows are zeroed; the rest keeps accumulating until it is picked, and the layer adds their
    #: LoRA term o_A·Bᵀ forward and backward: three small bf16 GEMMs, no cast) or "discard" (zero all
    #: of B after every merge: the paper). Moot with ``topk="all"``.
    #: "keep" learns at a third of the paper's learning rate on the demo task and beats it by far
    #: (benchmarks/bench_learning.py; README).
    unmerged: str = "keep"
    #: With ``topk="all"`` or ``unmerged="keep"``: what FP8 rounding drops from a merged row
    #: (projected onto A's rows) is put back into B instead of zero, so updates smaller than an FP8
    #: step accumulate until they move a byte instead of being lost (error feedback; one k × in × r
    #: matmul per merge, A's projector computed once), and the forward sees them.
    #: The default (benchmarks/bench_learning.py; README). Inert with ``unmerged="discard"`` and a
    #: top-k merge: the paper's merge zeroes all of B, so there is nothing to carry back.
    carry_residual: bool = True
    #: Merge B into the backbone after every N-th optimizer step instead of every one (1, the
    #: default): the merge's cost is divided by N; in between, B holds the steps' updates and the
    #: layer adds their LoRA term forward and backward (three small GEMMs, as LoRA). Trades a little
    #: learning for speed (measured in benchmarks/bench_learning.py).
    merge_every: int = 1
    #: The fixed tensor-wise scale is ``scale_headroom · amax([W; A])/448`` (a power of two): merged
    #: weights can grow that many times the initial amax before they clamp at ±448. Powers of two
    #: leave the bits of every value above E4M3's smallest normal as they are.
    scale_headroom: int = 1
    #: Keep a transposed copy of each layer's W rows for the backward GEMM ∂L/∂x (FP8 tensor cores
    #: need W column-major there): saves one transpose per layer per backward pass, costs one more
    #: byte per backbone parameter. Not with ZeRO-3 (the copy would be a full W per rank).
    cache_weight_transpose: bool = False
    #: Seed of the generator used by initialization, so every rank builds identical bytes.
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "FalqonConfig"
        check_positive_int(owner, "rank", self.rank)
        if self.topk is not None and self.topk != "all" and (not is_int(self.topk) or self.topk <= 0):
            raise InvalidField(owner, "topk", "must be None (= rank), 'all' or an integer in 1..out_features", self.topk)
        check_choice(owner, "init", self.init, INIT_NAMES)
        check_choice(owner, "backend", self.backend, BACKEND_NAMES)
        check_choice(owner, "merge_rounding", self.merge_rounding, MERGE_ROUNDINGS)
        check_choice(owner, "unmerged", self.unmerged, UNMERGED)
        check_bool(owner, "carry_residual", self.carry_residual)
        if self.merge_rounding == "stochastic" and carry_is_live(self.topk, self.unmerged, self.carry_residual):
            raise InvalidField(owner, "merge_rounding", STOCHASTIC_WITH_CARRY, self.merge_rounding)
        check_positive_int(owner, "merge_every", self.merge_every)
        check_positive_int(owner, "scale_headroom", self.scale_headroom)
        if self.scale_headroom & (self.scale_headroom - 1):
            raise InvalidField(owner, "scale_headroom", "must be a power of two (1, 2, 4, ...)", self.scale_headroom)
        check_bool(owner, "cache_weight_transpose", self.cache_weight_transpose)
        check_int(owner, "seed", self.seed)
