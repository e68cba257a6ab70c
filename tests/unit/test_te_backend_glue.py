"""The ``te`` backend's own logic on CPU, against a stand-in for Transformer Engine.

Transformer Engine needs CUDA, so the real backend is tested in ``tests/gpu``. What can go wrong in
*our* code is tested here with a minimal stand-in that follows TE's documented conventions:
``general_gemm(A, B, layout="TN")`` returns ``(B · Aᵀ, ...)`` (how TE's own ``Linear`` computes
``x Wᵀ`` as ``general_gemm(W, x)``), operands are ``Float8Tensor``-like objects built from row-major
uint8 bits and a ``scale_inv``, and a current-scaling quantizer returns storage with
``get_data_tensors()`` → ``(rowwise bits, transposed bits or None)``. Checked: operand orientation and
padding (the result equals the emulated backend's), the workspace argument of TE < 2.10 versus none
from 2.10 on, and the strided-view fallback when TE writes no transposed copy.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from falqon_dist import fp8
from falqon_dist.fp8.te_backend import TEBackend

TE_DTYPES = {fp8.E4M3: "kFloat8E4M3", fp8.E5M2: "kFloat8E5M2"}
TORCH_DTYPES = {v: k for k, v in TE_DTYPES.items()}


def _dequantize(operand) -> torch.Tensor:
    bits = operand.data
    assert (
        bits.dtype == torch.uint8
        and bits.is_contiguous()
        and tuple(bits.shape) == tuple(operand.shape)
    )
    assert all(d % 16 == 0 for d in bits.shape), (
        "FP8 GEMM operands must be padded to multiples of 16"
    )
    return bits.view(TORCH_DTYPES[operand.fp8_dtype]).double() * operand.fp8_scale_inv.double()


#: ``use_split_accumulator`` of every stand-in GEMM call, in order.
SPLIT_ACCUMULATOR_CALLS: list[bool] = []


def _gemm_v2_10(
    A, B, out_dtype=None, quantization_params=None, layout="TN", use_split_accumulator=False, **kw
):
    assert layout == "TN" and not kw
    SPLIT_ACCUMULATOR_CALLS.append(use_split_accumulator)
    return (_dequantize(B) @ _dequantize(A).T).to(out_dtype), None, None, None


def _gemm_v2_9(
    A,
    B,
    workspace,
    out_dtype=None,
    quantization_params=None,
    layout="TN",
    use_split_accumulator=False,
):
    # Hopper size
    assert workspace.dtype == torch.uint8 and workspace.numel() == 32 * 1024 * 1024 + 1024
    return _gemm_v2_10(A, B, out_dtype, quantization_params, layout, use_split_accumulator)


class _Quantizer:
    """Current scaling as TE does it: ``scale = F/amax``, cast ``x·scale``; optional transposed copy."""

    write_transpose = True

    def __init__(self, te_dtype, device, *, rowwise=True, columnwise=True):
        self.fmt, self.columnwise, self.internal = TORCH_DTYPES[te_dtype], columnwise, False

    def __call__(self, x):
        assert x.is_contiguous() and self.internal
        amax = x.abs().amax().float()
        scale = fp8.FP8_MAX[self.fmt] / amax
        bits = (
            (x.float() * scale)
            .clamp(-fp8.FP8_MAX[self.fmt], fp8.FP8_MAX[self.fmt])
            .to(self.fmt)
            .view(torch.uint8)
        )
        transposed = bits.t().contiguous() if self.columnwise and self.write_transpose else None
        return SimpleNamespace(
            get_data_tensors=lambda: (bits, transposed), _scale_inv=(1 / scale).reshape(1)
        )


def _backend(general_gemm, monkeypatch) -> TEBackend:
    backend = object.__new__(TEBackend)  # skip __init__: it imports the real Transformer Engine
    backend._te = SimpleNamespace(
        version="test",
        general_gemm=general_gemm,
        gemm_takes_workspace=general_gemm is _gemm_v2_9,
        quantizer_cls=_Quantizer,
        tensor_cls=lambda **kwargs: SimpleNamespace(**kwargs),
        dtypes=TE_DTYPES,
    )
    backend._workspaces = {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    # CPU tensors here
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return backend


@pytest.mark.parametrize("general_gemm", [_gemm_v2_9, _gemm_v2_10], ids=["te<2.10", "te>=2.10"])
@pytest.mark.parametrize(
    "m, k, n, fmt_a, transpose_a",
    [(64, 128, 96, fp8.E4M3, False), (50, 72, 30, fp8.E5M2, False), (96, 40, 16, fp8.E5M2, True)],
)
def test_gemm_maps_a_at_b_onto_te_tn_layout(general_gemm, m, k, n, fmt_a, transpose_a, monkeypatch):
    backend = _backend(general_gemm, monkeypatch)
    a_hp = torch.randn(k, m).t() if transpose_a else torch.randn(m, k)
    a, sa = fp8.quantize_dynamic(a_hp, fmt_a)
    # a transposed weight, strided
    b, sb = fp8.quantize_dynamic(torch.randn(n, k).t() * 0.02, fp8.E4M3)
    out = backend.gemm(a, b, sa, sb, torch.float32)
    expected = fp8.resolve_backend("emulated").gemm(a, b, sa, sb, torch.float32)
    assert out.shape == (m, n) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("write_transpose", [True, False], ids=["hopper-copy", "no-copy"])
def test_quantize_returns_bits_scale_and_transpose(write_transpose, monkeypatch):
    backend = _backend(_gemm_v2_10, monkeypatch)
    monkeypatch.setattr(_Quantizer, "write_transpose", write_transpose)
    x = torch.randn(48, 80, dtype=torch.bfloat16)
    x_fp8, scale, x_fp8_t = backend.quantize(x, fp8.E5M2, transpose=True)
    ref_fp8, ref_scale = fp8.quantize_dynamic(x, fp8.E5M2)
    assert x_fp8.dtype == fp8.E5M2 and x_fp8_t.shape == (80, 48) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    assert torch.equal(x_fp8_t.float(), x_fp8.float().t())
    assert (fp8.to_bits(x_fp8) != fp8.to_bits(ref_fp8)).float().mean() < 1e-3
    assert backend.quantize(x, fp8.E4M3)[2] is None
    with pytest.raises(ValueError, match="2-D"):
        backend.quantize(x.reshape(2, 24, 80), fp8.E4M3)


def test_falqon_layer_runs_on_the_te_glue(monkeypatch):
    """The whole FALQON layer through the stand-in: same result as the emulated backend."""
    import falqon_dist as fd

    backend = _backend(_gemm_v2_10, monkeypatch)
    monkeypatch.setattr(
        "falqon_dist.method.linear.resolve_backend", lambda name, device="cpu": backend
    )
    linear = torch.nn.Linear(128, 96)
    layer = fd.FalqonLinear.from_linear(linear, fd.FalqonConfig(rank=16, backend="emulated"))
    reference = fd.FalqonLinear.from_linear(linear, fd.FalqonConfig(rank=16, backend="emulated"))
    x, g = torch.randn(40, 128), torch.randn(40, 96)
    SPLIT_ACCUMULATOR_CALLS.clear()
    results = []
    for each, patched in ((layer, True), (reference, False)):
        if not patched:
            monkeypatch.undo()
        xi = x.clone().requires_grad_()
        y = each(xi)
        y.backward(g)
        results.append((y.detach(), xi.grad, each.B.grad))
    for got, want in zip(*results, strict=True):
        assert fp8.sqnr_db(want, got) > 40
    # forward GEMM with fast accumulation; ∂L/∂x and ∂L/∂B promote every partial sum to fp32
    assert SPLIT_ACCUMULATOR_CALLS == [False, True, True]
