"""FALQON layer configuration: the merge recipe and the fields every converted layer reads.

After each optimizer step a FALQON layer merges its proxy B into the FP8 backbone. *How* is one
named recipe (``merge``), because the three choices it fixes only make sense together:

==============  ===========================  ==========================  =====  ======================
merge           rows merged after a step     rows a merge does not take  carry  merge_rounding
==============  ===========================  ==========================  =====  ======================
``every_row``   all (the default)            —                           yes    nearest
``topk_carry``  row-wise top-k (``topk``)    stay in B, accumulate       yes    nearest
``topk_keep``   row-wise top-k               stay in B, accumulate       no     nearest, stochastic
``paper``       row-wise top-k               B zeroed (the authors')     no     nearest, stochastic
==============  ===========================  ==========================  =====  ======================

The *carry* puts what FP8 rounding dropped from a merged row, projected onto A's rows, back into B
(error feedback), so updates below half an FP8 step accumulate until they move a byte. Stochastic
rounding is unbiased on its own and is refused with a carry: the carry would feed its noise back
(:data:`STOCHASTIC_WITH_CARRY`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from falqon_dist.config_checks import (
    InvalidField,
    check_bool,
    check_choice,
    check_int,
    check_positive_int,
    is_int,
)
from falqon_dist.fp8.backends import BACKEND_NAMES

INIT_NAMES = ("svd", "random")
MERGE_ROUNDINGS = ("nearest", "stochastic")


class MergeRecipe(NamedTuple):
    """What one ``merge`` recipe does after an optimizer step (see the module docstring)."""

    #: Merges the row-wise top-k of ``Σ_k |B_jk|`` (else every row).
    top_k: bool
    #: The rows a merge does not take stay in B and keep accumulating (else B is zeroed). Every row
    #: merges take them all; rows given explicitly (``FalqonLinear.merge_proxy_(rows=...)``) leave the
    #: others in B.
    keeps_unmerged: bool
    #: What FP8 rounding drops from a merged row goes back into B (projected onto A's rows).
    carries: bool


#: The ``merge`` recipes, by name.
MERGE_RECIPES: dict[str, MergeRecipe] = {
    "every_row": MergeRecipe(top_k=False, keeps_unmerged=True, carries=True),
    "topk_carry": MergeRecipe(top_k=True, keeps_unmerged=True, carries=True),
    "topk_keep": MergeRecipe(top_k=True, keeps_unmerged=True, carries=False),
    "paper": MergeRecipe(top_k=True, keeps_unmerged=False, carries=False),
}
MERGES = tuple(MERGE_RECIPES)
#: The recipes that take ``topk`` (the others merge every row).
TOPK_MERGES = tuple(name for name, recipe in MERGE_RECIPES.items() if recipe.top_k)
#: The recipes ``merge_rounding="stochastic"`` goes with: those without a carry.
STOCHASTIC_MERGES = tuple(name for name, recipe in MERGE_RECIPES.items() if not recipe.carries)

#: Why ``merge_rounding="stochastic"`` is refused with a recipe that carries.
STOCHASTIC_WITH_CARRY = (
    f"can be 'stochastic' only with merge={' or '.join(repr(m) for m in STOCHASTIC_MERGES)}, which carry nothing: "
    "the carry puts what rounding drops back into B, so it would feed the rounding noise into the next merge and "
    "the bytes would random-walk even when B receives no update (about 29% of the weight's norm after 1,000 "
    "merges, outside A's row space). Stochastic rounding is unbiased on its own; with a carrying merge keep "
    "merge_rounding='nearest'"
)


@dataclass(frozen=True)
class FalqonConfig:
    """How linear layers are converted to FALQON layers, and how they merge.

    Every field is validated on construction, combinations included; a bad value raises
    :class:`~falqon_dist.config_checks.InvalidField` (a ``ValueError``) naming the field and what
    would be valid. What depends on a layer's shape (``rank``, ``topk`` against its dimensions) is
    checked by :meth:`check_layer`.
    """

    #: LoRA rank r: A is (r, in) melded under the backbone rows, B is (out, r).
    rank: int = 64
    #: The merge recipe (module docstring): "every_row" (the default: nothing waits in B, which then
    #: holds only the carry; the forward adds its LoRA term, one small GEMM, the backward runs the
    #: paper's GEMMs), "topk_carry", "topk_keep" (the unmerged rows' LoRA term is live forward and
    #: backward: three small bf16 GEMMs, no cast) or "paper" (the authors' merge: B zeroed after every
    #: merge). every_row learns best on both benchmark tasks; topk_keep learns at a third of the
    #: paper's learning rate and beats it (benchmarks/README.md).
    merge: str = "every_row"
    #: Rows per top-k merge (row-wise top-k of Σ_k |B_jk|): None = rank, what the authors' code does,
    #: or a count up to each converted layer's out_features. Only with a top-k ``merge``.
    topk: int | None = None
    #: How A is initialized: "svd" (top-r SVD of the backbone's FP8 quantization error) or "random"
    #: (N(mean W, std W) clipped to [min W, max W]).
    init: str = "svd"
    #: FP8 GEMM backend: "auto" | "emulated" | "scaled_mm" | "te" (see falqon_dist.fp8.backends).
    backend: str = "auto"
    #: How merged weights are rounded back to E4M3: "nearest" (the paper) or "stochastic" (unbiased:
    #: an update below half an FP8 step still moves the weight on average; seeded by ``seed`` and the
    #: optimizer step, so every rank draws the same noise). "stochastic" only with a recipe that
    #: carries nothing, "topk_keep" or "paper" (:data:`STOCHASTIC_WITH_CARRY`).
    merge_rounding: str = "nearest"
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
        check_choice(owner, "merge", self.merge, MERGES)
        if self.topk == "all":
            raise InvalidField(
                owner,
                "topk",
                "must be None (= rank) or a positive integer: every row at every "
                "merge is merge='every_row' (with topk=None)",
                self.topk,
            )
        if self.topk is not None and (not is_int(self.topk) or self.topk <= 0):
            raise InvalidField(
                owner,
                "topk",
                "must be None (= rank) or a positive integer (rows per top-k merge)",
                self.topk,
            )
        if self.topk is not None and not self.recipe.top_k:
            raise InvalidField(
                owner,
                "topk",
                f"must stay None with merge={self.merge!r}, which merges every row; "
                f"a count of rows needs a top-k merge: {', '.join(repr(m) for m in TOPK_MERGES)}",
                self.topk,
            )
        check_choice(owner, "init", self.init, INIT_NAMES)
        check_choice(owner, "backend", self.backend, BACKEND_NAMES)
        check_choice(owner, "merge_rounding", self.merge_rounding, MERGE_ROUNDINGS)
        if self.merge_rounding == "stochastic" and self.recipe.carries:
            raise InvalidField(
                owner,
                "merge_rounding",
                f"{STOCHASTIC_WITH_CARRY} (merge={self.merge!r} carries)",
                self.merge_rounding,
            )
        check_positive_int(owner, "merge_every", self.merge_every)
        check_positive_int(owner, "scale_headroom", self.scale_headroom)
        if self.scale_headroom & (self.scale_headroom - 1):
            raise InvalidField(
                owner,
                "scale_headroom",
                "must be a power of two (1, 2, 4, ...)",
                self.scale_headroom,
            )
        check_bool(owner, "cache_weight_transpose", self.cache_weight_transpose)
        check_int(owner, "seed", self.seed)

    @property
    def recipe(self) -> MergeRecipe:
        """What ``merge`` does (:data:`MERGE_RECIPES`)."""
        return MERGE_RECIPES[self.merge]

    def check_layer(self, in_features: int, out_features: int, name: str | None = None) -> None:
        """Whether a layer of this shape can be converted: ``rank ≤ min(in, out)`` and, for a top-k
        merge, ``topk ≤ out``; else :class:`InvalidField` naming the field and the layer (``name``).
        The one check of these facts: :class:`~falqon_dist.method.FalqonLinear` runs it on
        construction, :func:`~falqon_dist.method.convert.check_convertible` for every layer of a
        model before anything is converted."""
        layer = (
            f"{name!r} ({in_features}→{out_features})"
            if name
            else f"a {in_features}→{out_features} layer"
        )
        if self.rank > min(in_features, out_features):
            raise InvalidField(
                "FalqonConfig",
                "rank",
                f"cannot exceed min(in_features, out_features) of a layer it "
                f"converts, and {layer} has {min(in_features, out_features)}: lower the rank or "
                "exclude the layer",
                self.rank,
            )
        if self.topk is not None and self.topk > out_features:
            raise InvalidField(
                "FalqonConfig",
                "topk",
                f"cannot exceed the out_features of a layer it converts, and "
                f"{layer} has {out_features}: use topk=None (= rank), at most the smallest "
                "out_features of the converted layers, or exclude the layer",
                self.topk,
            )
