"""FP8 formats and GEMM backends against float references."""

from __future__ import annotations

import pytest
import torch

from falqon_dist import fp8


def test_e4m3_roundtrip_is_exact_for_representable_values():
    # Every finite E4M3 value, built from its bits, survives quantize(scale=1) unchanged.
    bits = torch.arange(256, dtype=torch.uint8)
    values = fp8.from_bits(bits, fp8.E4M3).float()
    finite = values.isfinite()
    back = fp8.to_bits(fp8.quantize(values[finite], torch.ones(1), fp8.E4M3))
    assert torch.equal(back, bits[finite])


@pytest.mark.parametrize("fmt, max_value", [(fp8.E4M3, 448.0), (fp8.E5M2, 57344.0)])
def test_quantize_saturates_instead_of_nan(fmt, max_value):
    x = torch.tensor([1e9, -1e9, 0.0])
    q = fp8.quantize(x, torch.ones(1), fmt).float()
    assert q.tolist() == [max_value, -max_value, 0.0]


def test_tensorwise_scale_maps_amax_to_format_max():
    x = torch.randn(64, 64) * 3
    s = fp8.tensorwise_scale(x, fp8.E4M3)
    assert s.shape == (1,) and s.dtype == torch.float32
    assert torch.isclose(x.abs().max() / s, torch.tensor(448.0))
    assert fp8.tensorwise_scale(torch.zeros(3)).item() == 1.0


@pytest.mark.parametrize("fmt, min_sqnr", [(fp8.E4M3, 28.0), (fp8.E5M2, 22.0)])
def test_quantize_dequantize_sqnr(fmt, min_sqnr):
    # E4M3 keeps 3 mantissa bits (~31 dB on Gaussian data), E5M2 keeps 2 (~25 dB).
    x = torch.randn(256, 256)
    q, s = fp8.quantize_dynamic(x, fmt)
    assert fp8.sqnr_db(x, fp8.dequantize(q, s)) > min_sqnr


def test_bits_must_be_uint8():
    with pytest.raises(TypeError, match="uint8"):
        fp8.from_bits(torch.zeros(3, dtype=torch.int8))


def _exact_product(a_fp8, b_fp8, sa, sb):
    return (a_fp8.double() @ b_fp8.double()) * sa.double() * sb.double()


@pytest.mark.parametrize("backend", ["emulated", "scaled_mm"])
@pytest.mark.parametrize("shape", [(32, 64, 48), (5, 24, 7)])  # aligned, and needing padding
@pytest.mark.parametrize("transpose_b", [False, True])
def test_gemm_backends_match_exact_product_fp32(backend, shape, transpose_b):
    m, k, n = shape
    a, sa = fp8.quantize_dynamic(torch.randn(m, k), fp8.E4M3)
    b_hp = torch.randn(n, k).t() if transpose_b else torch.randn(k, n)
    b, sb = fp8.quantize_dynamic(b_hp, fp8.E5M2)
    out = fp8.resolve_backend(backend).gemm(a, b, sa, sb, torch.float32)
    ref = _exact_product(a, b, sa, sb)
    assert out.shape == (m, n) and out.dtype == torch.float32
    # products are exact and accumulation is fp32: only fp32 summation rounding remains
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("backend", ["emulated", "scaled_mm"])
def test_gemm_backends_bf16_output(backend):
    a, sa = fp8.quantize_dynamic(torch.randn(64, 128), fp8.E4M3)
    b, sb = fp8.quantize_dynamic(torch.randn(128, 32), fp8.E4M3)
    out = fp8.resolve_backend(backend).gemm(a, b, sa, sb, torch.bfloat16)
    ref = _exact_product(a, b, sa, sb)
    assert out.dtype == torch.bfloat16
    # one bf16 rounding of the result (2^-8 relative), possibly before the scale is applied
    torch.testing.assert_close(out.double(), ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())


def test_backends_agree():
    a, sa = fp8.quantize_dynamic(torch.randn(48, 80), fp8.E4M3)
    b, sb = fp8.quantize_dynamic(torch.randn(80, 40), fp8.E4M3)
    emulated = fp8.resolve_backend("emulated").gemm(a, b, sa, sb, torch.float32)
    scaled = fp8.resolve_backend("scaled_mm").gemm(a, b, sa, sb, torch.float32)
    torch.testing.assert_close(emulated, scaled, rtol=1e-5, atol=1e-5)


def test_resolve_backend():
    assert fp8.resolve_backend("auto", "cpu").name == "emulated"
    with pytest.raises(ValueError, match="valid"):
        fp8.resolve_backend("cublas")
    with pytest.raises(ValueError, match="CUDA tensors only"):
        fp8.resolve_backend("te", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_te_backend_unavailable_says_what_to_use_instead():
    from falqon_dist.fp8.te_backend import TransformerEngineUnavailable

    with pytest.raises(
        TransformerEngineUnavailable, match="CUDA is not available.*scaled_mm.*emulated"
    ):
        fp8.check_backend("te")
    for name in ("auto", "emulated", "scaled_mm"):
        fp8.check_backend(name)  # always usable
    with pytest.raises(ValueError, match="valid"):
        fp8.check_backend("cublas")


def test_te_version_parsing():
    from falqon_dist.fp8.te_backend import MIN_VERSION, _version_tuple

    assert _version_tuple("2.10.0") == (2, 10) > MIN_VERSION
    assert _version_tuple("2.2.0.dev0+abc") == (2, 2) == MIN_VERSION
    assert _version_tuple("1.13.0") < MIN_VERSION
    assert _version_tuple("2.9rc1") == (2, 9)
