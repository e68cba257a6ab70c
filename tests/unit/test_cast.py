"""Fused (compiled) FP8 casts: bit-identical to the eager reference, shared between layers safely."""

from __future__ import annotations

import pytest
import torch

import falqon_dist as fd
from falqon_dist import fp8
from falqon_dist.fp8 import cast as fp8_cast
from falqon_dist.fp8.instrument import HostSyncCounter, count_casts


@pytest.fixture
def eager_casts():
    fp8_cast.set_cast_kernels("eager")
    yield
    fp8_cast.set_cast_kernels("compiled")


def _inputs():
    torch.manual_seed(0)
    yield "fp32", torch.randn(96, 64) * 3
    yield "bf16", (torch.randn(200, 48) * 0.01).bfloat16()
    yield (
        "fp16 column slice",
        torch.randn(40, 80).half()[:, 16:48],
    )  # strided, like o_A = Y[:, out:]
    yield "transposed view", torch.randn(64, 32).t()
    yield "one row", torch.randn(1, 64)
    yield "all zeros", torch.zeros(16, 16)
    yield "with ±inf clamped", torch.tensor([[1.0, float("inf"), -float("inf"), 2.0]] * 4)


@pytest.mark.parametrize("fmt", [fp8.E4M3, fp8.E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("transpose_copy", [False, True], ids=["plain", "with-transposed-copy"])
def test_compiled_cast_is_bit_identical_to_eager(fmt, transpose_copy):
    assert fp8_cast.cast_kernels() == "compiled"
    for name, x in _inputs():
        got_q, got_s, got_t = fp8_cast.dynamic_cast(x, fmt, transpose_copy=transpose_copy)
        want_q, want_s = fp8.quantize_dynamic(x, fmt)
        assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8)), name
        assert (
            torch.equal(got_s, want_s) and got_s.shape == (1,) and got_s.dtype == torch.float32
        ), name
        if transpose_copy:
            assert got_t.is_contiguous() and torch.equal(
                got_t.view(torch.uint8), want_q.t().view(torch.uint8)
            ), name
        else:
            assert got_t is None


def test_eager_mode_runs_the_reference_and_bad_modes_are_refused(eager_casts):
    x = torch.randn(32, 32)
    q, s, _ = fp8_cast.dynamic_cast(x, fp8.E4M3)
    assert torch.equal(q.view(torch.uint8), fp8.quantize_dynamic(x)[0].view(torch.uint8))
    with pytest.raises(ValueError, match="compiled.*eager"):
        fp8_cast.set_cast_kernels("triton")


def test_scale_epilogue_matches_eager():
    product = torch.randn(64, 48).bfloat16()
    scale = torch.tensor([0.0123])
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        assert torch.equal(
            fp8_cast.scale_epilogue(product, scale, dtype), (product.float() * scale).to(dtype)
        )


def test_dispatch_mode_probe_exists_and_falls_back_to_the_same_bits():
    """torch.compile cannot run under a TorchDispatchMode; the cast then runs eagerly (torch internal checked)."""
    from torch.utils import _python_dispatch

    assert callable(_python_dispatch._get_current_dispatch_mode)
    x = torch.randn(48, 32)
    outside = fp8_cast.dynamic_cast(x, fp8.E5M2)[0]
    with HostSyncCounter():
        assert fp8_cast._dispatch_mode_active()
        inside = fp8_cast.dynamic_cast(x, fp8.E5M2)[0]
    assert not fp8_cast._dispatch_mode_active()
    assert torch.equal(inside.view(torch.uint8), outside.view(torch.uint8))


class _Attention(torch.nn.Module):
    """q/k/v read the same tensor, like a transformers attention block."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(64, 64, bias=False) for _ in range(3))

    def forward(self, h):
        return self.q(h) + self.k(h) * self.v(h)


def _converted(module):
    fd.convert_model(module, fd.FalqonConfig(rank=16, backend="emulated"))
    return module


def test_layers_reading_one_tensor_share_one_cast_and_match_separate_casts():
    torch.manual_seed(0)
    shared = _converted(_Attention())
    h = torch.randn(2, 24, 64, requires_grad=True)
    with count_casts() as casts:
        y = shared(h)
    assert casts.count(fp8.E4M3) == 1 + 3  # one cast of h for q, k and v; one Q(o_A) per layer
    # same outputs and gradients as three independent inputs (no sharing possible)
    separate_inputs = [h.detach().clone().requires_grad_() for _ in range(3)]
    y_sep = shared.q(separate_inputs[0]) + shared.k(separate_inputs[1]) * shared.v(
        separate_inputs[2]
    )
    assert torch.equal(y, y_sep)
    y.sum().backward()
    y_sep.sum().backward()
    # the same three ∂L/∂x terms, summed by autograd in its own order
    torch.testing.assert_close(h.grad, sum(x.grad for x in separate_inputs), rtol=1e-6, atol=1e-6)


def test_shared_cast_misses_after_an_in_place_write_or_on_another_tensor():
    torch.manual_seed(0)
    layer = _converted(torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)))[0]
    h = torch.randn(8, 64)
    with count_casts() as casts:
        first = layer(h)
        assert torch.equal(layer(h), first) and casts.count(fp8.E4M3) == 3  # x once, Q(o_A) twice
        h.mul_(2)  # bumps the version counter: the cached cast is stale
        assert not torch.equal(layer(h), first) and casts.count(fp8.E4M3) == 5
        layer(h.clone())  # equal values, another tensor: cast again
        assert casts.count(fp8.E4M3) == 7


def test_many_input_variants_stay_bit_identical_beyond_the_recompile_limit():
    """dtypes × layouts × sizes (1 included) × formats: never an error, always the eager bits."""
    torch.manual_seed(0)
    shapes = [(1, 64), (3, 5), (64, 1), (17, 33), (256, 48)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows, cols in shapes:
            base = torch.randn(rows, cols * 2, dtype=dtype)
            for x in (base, base[:, ::2], base.t(), base[:, cols:]):
                for fmt in (fp8.E4M3, fp8.E5M2):
                    for copy in (False, True):
                        got_q, got_s, got_t = fp8_cast.dynamic_cast(x, fmt, transpose_copy=copy)
                        want_q, want_s = fp8.quantize_dynamic(x, fmt)
                        assert got_q.shape == x.shape and torch.equal(got_s, want_s)
                        assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
                        if copy:
                            assert torch.equal(
                                got_t.view(torch.uint8), want_q.t().contiguous().view(torch.uint8)
                            )


def test_compiled_variants_need_one_function_each():
    """dynamo keeps graphs per code object: two variants behind one function would share its budget."""
    from falqon_dist.fp8.cast import CompiledVariants

    def make(k):
        return lambda x: x + k  # one code object for every k

    with pytest.raises(ValueError, match="its own function"):
        CompiledVariants({1: make(1), 2: make(2)})
    variants = CompiledVariants({1: lambda x: x + 1, 2: lambda x: x + 2})
    assert (
        torch.equal(variants[2](torch.ones(3)), torch.full((3,), 3.0))
        and variants[2] is variants[2]
    )
