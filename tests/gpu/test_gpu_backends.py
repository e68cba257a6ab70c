"""CUDA tier: the ``scaled_mm`` (cuBLASLt FP8 via torch) and ``te`` (Transformer Engine) backends
against the emulated one and exact references.

Every test is marked ``gpu``; ``tests/conftest.py`` skips them without CUDA. Run them with
``launch/gpu_check.sh`` (or ``pytest tests/gpu``) on a GPU machine; FP8 GEMMs need compute
capability ≥ 8.9 (Ada, Hopper, Blackwell), so those tests also skip on older GPUs, and the ``te``
cases skip (with the reason) where Transformer Engine does not import.

Tolerances. The two backends see the *same* FP8 operands and scales; products are exact in both, so
they differ only by accumulation order (float32 on both) and by output rounding:

* ``te`` casts with TE's own kernel (``x · fl(F/amax)`` instead of ``x / fl(amax/F)``): about 1 in
  5·10⁶ elements lands on the neighbouring FP8 value, which moves a float32 layer output by ~1e-4
  relative, so whole-layer comparisons of ``te`` with ``emulated`` use SQNR > 40 dB (as for bf16);
  its GEMM on shared operands keeps the float32 tolerance below;
* float32 outputs: Hopper's FP8 tensor cores keep ~13 mantissa bits in their accumulator between
  promotions to float32, so a promoted GEMM (every backward GEMM) agrees with a float64 dequantized
  reference and with ``emulated`` to ~3e-4 relative (Frobenius), not to the 1e-5 that holds between
  CPU backends. FALQON's forward GEMM runs with fast accumulation (fewer promotions: ~10–20%
  faster), which is compared by SQNR > 40 dB like a bf16 output;
* bf16 outputs: one or two bf16 roundings (2⁻⁸ relative each) — SQNR > 40 dB (bf16 rounding noise
  alone is ~50 dB);
* ∂L/∂B is formed from ``o_A`` re-quantized to E4M3 with a dynamic scale: when ``o_A`` differs in
  its last bits between backends, a few elements can round to a neighbouring FP8 value, so ∂L/∂B is
  compared by SQNR > 30 dB (one E4M3 step is 2⁻³ relative on the affected element only);
* training steps: losses of the two backends agree within 2e-2 (bf16 logits), and the loss falls
  while overfitting one batch.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import falqon_dist as fd
from falqon_dist import fp8
from falqon_dist.baselines import Fp8LoraConfig, Fp8LoraLinear
from falqon_dist.methods import prepare_model

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


GPU_BACKENDS = ["scaled_mm", "te"]


def _needs_fp8_hardware(backend: str = "scaled_mm") -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need CUDA compute capability >= 8.9")
    if backend == "te":
        try:
            fp8.check_backend("te")
        except ImportError as exc:
            pytest.skip(str(exc))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _linear(
    in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype, seed: int = 0
) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight, std=0.02)  # bell-shaped like trained LLM weights
    return linear.to(CUDA, dtype)


def _run(
    layer: nn.Module, x: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    return y.detach(), x.grad


def _pair(layer: nn.Module, backend: str) -> tuple[nn.Module, nn.Module]:
    """The same layer (same bytes) with the emulated backend and with ``backend``."""
    emulated, other = copy.deepcopy(layer), copy.deepcopy(layer)
    for twin, name in ((emulated, "emulated"), (other, backend)):
        if isinstance(twin, fd.FalqonLinear):  # the layer derives its backend from its config
            twin.config = dataclasses.replace(twin.config, backend=name)
        else:
            twin.backend = name
    return emulated, other


#: Relative error of a promoted float32 FP8 GEMM against an exact reference (Hopper accumulator).
FP32_PROMOTED_RTOL = 3e-4


def _assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    same_casts: bool = True,
    fast_accum: bool = False,
) -> None:
    if dtype == torch.float32 and same_casts and not fast_accum:
        rel = _rel(actual, expected)
        assert rel < FP32_PROMOTED_RTOL, f"{what}: relative error {rel:.2e}"
    else:
        sqnr = fp8.sqnr_db(expected, actual)
        assert sqnr > 40, f"{what}: SQNR {sqnr:.1f} dB"


# --------------------------------------------------------------------------- layers


def test_auto_resolves_to_scaled_mm_on_fp8_hardware():
    _needs_fp8_hardware()
    assert fp8.resolve_backend("auto", CUDA).name == "scaled_mm"
    assert fp8.resolve_backend("auto", "cpu").name == "emulated"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias, cache_weight_transpose", [(False, False), (True, True)])
def test_falqon_linear_gpu_backend_matches_emulated(backend, dtype, bias, cache_weight_transpose):
    _needs_fp8_hardware(backend)
    linear = _linear(1024, 768, bias=bias, dtype=dtype)
    config = fd.FalqonConfig(
        rank=64, backend="emulated", cache_weight_transpose=cache_weight_transpose
    )
    layer = fd.FalqonLinear.from_linear(linear, config)
    emulated, scaled = _pair(layer, backend)
    x = torch.randn(4, 256, 1024, device=CUDA, dtype=dtype)
    grad = torch.randn(4, 256, 768, device=CUDA, dtype=dtype)
    y_e, gx_e = _run(emulated, x, grad)
    y_s, gx_s = _run(scaled, x, grad)
    assert y_s.dtype == dtype and gx_s.dtype == dtype and y_s.shape == (4, 256, 768)
    _assert_close(y_s, y_e, dtype, "y", same_casts=backend != "te", fast_accum=True)
    _assert_close(gx_s, gx_e, dtype, "grad_x", same_casts=backend != "te")
    assert fp8.sqnr_db(emulated.B.grad, scaled.B.grad) > 30
    assert scaled.qweight.grad is None and scaled.scale.dtype == torch.float32
    if cache_weight_transpose:
        assert scaled.weight_t_cache.nbytes == 768 * 1024


#: The merge recipes the tier runs: the default (every row each step, with the carry) and the paper's.
MERGES = {
    "default": {},
    "paper": {"merge": "paper"},
}


@pytest.mark.parametrize("merge", list(MERGES))
def test_falqon_merge_on_cuda_is_deterministic_and_matches_cpu(merge):
    """The proxy merge on CUDA: the same bytes on every run (what replicas need), and the CPU's values.

    The default merge runs the Triton kernel on CUDA and the torch tiles on the CPU; both compute
    each update as an fp32 multiply-add chain over the rank, so the bytes should be equal. The
    paper's top-r rows take a cuBLAS GEMM, which may sum the r terms in another order: an element
    on an E4M3 rounding boundary may then land one FP8 step apart, at most 0.1% of the merged ones.
    """
    _needs_fp8_hardware()
    linear = _linear(512, 384, bias=False, dtype=torch.float32)
    layer = fd.FalqonLinear.from_linear(
        linear, fd.FalqonConfig(rank=16, backend="scaled_mm", **MERGES[merge])
    )
    torch.manual_seed(1)
    proxy = torch.randn(384, 16) * 0.05
    first, second, on_cpu = copy.deepcopy(layer), copy.deepcopy(layer), copy.deepcopy(layer).cpu()
    stats = first.merge_proxy_(proxy.to(CUDA)).to_dict()
    assert second.merge_proxy_(proxy.to(CUDA)).to_dict() == stats
    assert torch.equal(first.qweight, second.qweight) and torch.equal(first.B, second.B)
    assert stats["rows_merged"] == (384 if merge == "default" else 16)
    cpu_stats = on_cpu.merge_proxy_(proxy).to_dict()
    differing = int((first.qweight.cpu() != on_cpu.qweight).sum())
    if merge == "default":
        assert differing == 0 and stats == cpu_stats, (differing, stats, cpu_stats)
        assert fp8.sqnr_db(on_cpu.B, first.B.cpu()) > 100  # the carry: fp32 sums in another order
    else:
        assert not first.B.any() and differing <= 16 * 512 // 1000, differing
    assert fp8.sqnr_db(on_cpu.backbone_weight(), first.backbone_weight().cpu()) > 40


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("world", [1, 3])
def test_triton_merge_kernel_on_cuda_writes_the_cpu_tiles_bytes(stochastic, world):
    """The kernel compiled for this GPU against the CPU reference (the torch tiles), over ZeRO-3-style
    slices too: equal bytes and counts, the carry equal to fp32 rounding. Shapes of a real layer
    (several programs, a rank that is not a power of two), saturating and non-finite rows of B."""
    pytest.importorskip("triton")
    from falqon_dist.method import every_row
    from falqon_dist.method.merge_math import adapter_projector
    from falqon_dist.method.rounding import Rounding

    gen = torch.Generator().manual_seed(4)
    out, in_features, rank = 1000, 1536, 24
    bits = fp8.to_bits(
        (torch.randn(out + rank, in_features, generator=gen) * 60).clamp(-448, 448).to(fp8.E4M3)
    )
    adapter_q = fp8.from_bits(bits, fp8.E4M3)[out:].float()
    proxy = torch.randn(out, rank, generator=gen) * 0.05
    proxy[2] *= 1e4
    proxy[5, 0] = float("nan")
    projector = adapter_projector(adapter_q)
    rounding = Rounding(stochastic=stochastic, seed=3, step=7)
    part = -(-bits.numel() // world)
    on_gpu, on_cpu = bits.clone().view(-1).to(CUDA), bits.clone().view(-1)
    for rank_index in range(world):
        lo, hi = rank_index * part, min((rank_index + 1) * part, bits.numel())
        every_row.set_merge_kernel("triton")
        got = every_row.merge_every_row_(
            on_gpu[lo:hi],
            lo,
            proxy.to(CUDA),
            adapter_q.to(CUDA),
            rounding,
            projector=projector.to(CUDA),
        )
        every_row.set_merge_kernel("auto")
        want = every_row.merge_every_row_(
            on_cpu[lo:hi], lo, proxy, adapter_q, rounding, projector=projector
        )
        assert got.stats.to_dict() == want.stats.to_dict()
        assert fp8.sqnr_db(want.carry, got.carry.cpu()) > 100
    differing = int((on_gpu.cpu() != on_cpu).sum())
    assert differing == 0, f"{differing} of {out * in_features} bytes differ"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_lora_gpu_backend_matches_emulated(backend, dtype):
    _needs_fp8_hardware(backend)
    linear = _linear(1024, 768, bias=True, dtype=dtype)
    layer = Fp8LoraLinear.from_linear(linear, rank=64, backend="emulated")
    with torch.no_grad():
        layer.lora_B.normal_(std=0.02)  # a non-zero adapter, so every FP8 GEMM contributes
    emulated, scaled = _pair(layer, backend)
    x = torch.randn(512, 1024, device=CUDA, dtype=dtype)
    grad = torch.randn(512, 768, device=CUDA, dtype=dtype)
    y_e, gx_e = _run(emulated, x, grad)
    y_s, gx_s = _run(scaled, x, grad)
    _assert_close(y_s, y_e, dtype, "y", same_casts=backend != "te")
    _assert_close(gx_s, gx_e, dtype, "grad_x", same_casts=backend != "te")
    # A and B gradients pass through the dynamically re-quantized h and ∂L/∂h (see module docstring)
    assert fp8.sqnr_db(emulated.lora_A.grad, scaled.lora_A.grad) > 30
    assert fp8.sqnr_db(emulated.lora_B.grad, scaled.lora_B.grad) > 30


# --------------------------------------------------------------------------- GEMM at LLM shapes


def _exact(a_fp8, b_fp8, sa, sb) -> torch.Tensor:
    return (a_fp8.double() @ b_fp8.double()) * sa.double() * sb.double()


@pytest.mark.parametrize(
    "m, k, n, fmt_a, transpose_a",
    [
        (
            2048,
            4096,
            4096 + 64,
            fp8.E4M3,
            False,
        ),  # FALQON forward, q/k/v/o_proj of a 7B model, r = 64
        (2048, 4096, 11008 + 64, fp8.E4M3, False),  # forward, gate/up_proj
        (2048, 11008, 4096, fp8.E5M2, False),  # ∂L/∂x of down_proj: E5M2 gradient × E4M3 W rows
        (4096, 2048, 64, fp8.E5M2, True),  # ∂L/∂B: gᵀ (transposed view) × o_A
        (2000, 4096, 4100, fp8.E4M3, False),  # unaligned: the backend pads to multiples of 16
    ],
)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_gemm_matches_exact_reference_at_llm_shapes(backend, m, k, n, fmt_a, transpose_a):
    _needs_fp8_hardware(backend)
    gen = torch.Generator(device=CUDA).manual_seed(0)
    a_hp = (
        torch.randn(k, m, device=CUDA, generator=gen).t()
        if transpose_a
        else torch.randn(m, k, device=CUDA, generator=gen)
    )
    b_hp = torch.randn(n, k, device=CUDA, generator=gen).t() * 0.02  # (k, n) as a transposed weight
    a, sa = fp8.quantize_dynamic(a_hp, fmt_a)
    b, sb = fp8.quantize_dynamic(b_hp, fp8.E4M3)
    backend = fp8.resolve_backend(backend, CUDA)
    ref = _exact(a, b, sa, sb)
    out32 = backend.gemm(a, b, sa, sb, torch.float32)
    assert out32.shape == (m, n) and out32.dtype == torch.float32
    assert _rel(out32, ref) < FP32_PROMOTED_RTOL, f"fp32 relative error {_rel(out32, ref):.2e}"
    out16 = backend.gemm(a, b, sa, sb, torch.bfloat16)
    assert out16.dtype == torch.bfloat16 and fp8.sqnr_db(ref, out16) > 40
    emulated = fp8.resolve_backend("emulated", CUDA).gemm(a, b, sa, sb, torch.float32)
    assert _rel(out32, emulated) < FP32_PROMOTED_RTOL
    fast = backend.gemm(a, b, sa, sb, torch.float32, fast_accum=True)  # what FALQON's forward runs
    assert fp8.sqnr_db(ref, fast) > 40, f"fast accumulation: SQNR {fp8.sqnr_db(ref, fast):.1f} dB"


@pytest.mark.parametrize("fmt", [fp8.E4M3, fp8.E5M2])
@pytest.mark.parametrize("shape", [(2048, 4096), (1000, 72)])
def test_te_fused_cast_matches_torch_cast(fmt, shape):
    """TE's amax + cast kernel against :func:`falqon_dist.fp8.quantize_dynamic`.

    TE computes ``scale = F/amax`` and multiplies, we divide by ``s = amax/F``: the scales agree to
    float32 rounding (rel. 1e-6), and an element can round to the neighbouring FP8 value only when
    ``x/s`` sits within a float32 ulp of a rounding boundary (≤ 0.01% of elements). The transposed
    copy written by the same kernel must be exactly the transpose.
    """
    _needs_fp8_hardware("te")
    te_backend = fp8.resolve_backend("te", CUDA)
    x = torch.randn(*shape, device=CUDA, dtype=torch.bfloat16) * 3
    x_fp8, scale, x_fp8_t = te_backend.quantize(x, fmt, transpose=True)
    ref_fp8, ref_scale = fp8.quantize_dynamic(x, fmt)
    assert (
        x_fp8.dtype == fmt
        and x_fp8.shape == shape
        and scale.dtype == torch.float32
        and scale.shape == (1,)
    )
    assert torch.allclose(scale, ref_scale, rtol=1e-6, atol=0)
    differing = int((fp8.to_bits(x_fp8) != fp8.to_bits(ref_fp8)).sum())
    assert differing <= x.numel() // 10_000, differing
    assert torch.equal(fp8.to_bits(x_fp8_t.contiguous()), fp8.to_bits(x_fp8).t().contiguous())
    assert te_backend.quantize(x, fmt)[2] is None


def test_conversion_on_the_gpu_matches_the_cpu():
    """``prepare_model(model, config, device=cuda)`` on a CPU-loaded model: every converted layer is built on the
    GPU (SVD init there), the rest stays put for DeepSpeed to move, and the result is the CPU's up to
    SVD rounding (the FP8 bytes of W can differ by one step where the melded scale moves)."""
    _needs_fp8_hardware()
    from transformers import LlamaForCausalLM

    from falqon_dist.models import tiny_config

    torch.manual_seed(0)
    on_cpu = LlamaForCausalLM(tiny_config())
    on_gpu = copy.deepcopy(on_cpu)
    names = prepare_model(on_cpu, fd.FalqonConfig(rank=16, backend="emulated"))
    assert prepare_model(on_gpu, fd.FalqonConfig(rank=16, backend="emulated"), device=CUDA) == names
    for (_, cpu_layer), (_, gpu_layer) in zip(
        fd.falqon_layers(on_cpu), fd.falqon_layers(on_gpu), strict=True
    ):
        assert (
            gpu_layer.qweight.is_cuda
            and gpu_layer.B.is_cuda
            and gpu_layer.scale.dtype == torch.float32
        )
        assert fp8.sqnr_db(cpu_layer.backbone_weight(), gpu_layer.backbone_weight().cpu()) > 40
    assert on_gpu.model.embed_tokens.weight.device.type == "cpu"


# --------------------------------------------------------------------------- fused casts, sync-free steps


@pytest.mark.parametrize("fmt", [fp8.E4M3, fp8.E5M2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_cast_on_cuda_is_bit_identical_to_eager(fmt, dtype):
    """The Triton kernel inductor writes for the fused cast gives the eager reference's bits."""
    _needs_fp8_hardware()
    from falqon_dist.fp8 import cast as fp8_cast

    x = (torch.randn(4096, 4096 + 64, device=CUDA) * 3).to(dtype)
    q, s, q_t = fp8_cast.dynamic_cast(x, fmt, transpose_copy=True)
    ref_q, ref_s = fp8.quantize_dynamic(x, fmt)
    assert torch.equal(s, ref_s) and torch.equal(fp8.to_bits(q), fp8.to_bits(ref_q))
    assert q_t.is_contiguous() and torch.equal(
        fp8.to_bits(q_t), fp8.to_bits(ref_q).t().contiguous()
    )


@pytest.mark.parametrize(
    "merge, rounding",
    [
        ("every_row", "nearest"),
        ("topk_carry", "nearest"),
        ("topk_keep", "stochastic"),
        ("paper", "nearest"),
        ("paper", "stochastic"),
    ],
)
def test_falqon_step_and_merge_never_synchronize_on_cuda(merge, rounding):
    """CUDA's sync debug mode raises on any host synchronization: fwd + bwd + merge of 4 layers run under it
    (the default's merge is the Triton kernel, the others gather and scatter top-r rows)."""
    _needs_fp8_hardware()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512, bias=False) for _ in range(4)]).to(
        CUDA, torch.bfloat16
    )
    fd.convert_model(
        model, fd.FalqonConfig(rank=16, backend="scaled_mm", merge=merge, merge_rounding=rounding)
    )
    fd.merge_proxies_(model, step=1)  # first call: compile the merge outside the check
    x = torch.randn(256, 512, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    model(x).float().pow(2).mean().backward()  # first call: compile the casts outside the check
    with torch.no_grad():
        for layer in model:
            layer.B.normal_(std=0.01)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x).float().pow(2).mean().backward()
        stats = fd.merge_proxies_(model, step=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rows = 512 if merge == "every_row" else 16
    assert stats.to_dict()["rows_merged"] == 4 * rows and stats.to_dict()["nonfinite"] == 0


def test_stochastic_merge_noise_is_the_same_on_cuda_and_cpu():
    """The counter-hash noise is integer arithmetic: identical bits on every device."""
    from falqon_dist.method.rounding import merge_noise

    _needs_fp8_hardware()
    index = torch.arange(1 << 20)
    assert torch.equal(merge_noise(3, 7, index.to(CUDA)).cpu(), merge_noise(3, 7, index))


# --------------------------------------------------------------------------- whole-model steps


def _tiny_model_and_batch(seed: int = 0):
    """A randomly initialized tiny-architecture Llama in bf16 on CUDA and one packed synthetic batch."""
    from transformers import LlamaForCausalLM

    from falqon_dist.data import DataConfig, build_data
    from falqon_dist.models import build_tiny_tokenizer, tiny_config

    tokenizer = build_tiny_tokenizer()
    bundle = build_data(
        DataConfig(task="shift", max_length=128, packing=True, num_train=200, num_eval=8), tokenizer
    )
    batch = bundle.collate_fn([bundle.train[i] for i in range(8)])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config()).to(CUDA, torch.bfloat16)
    return model, {k: v.to(CUDA) for k, v in batch.items()}


def _overfit(model: nn.Module, batch: dict, lr: float, steps: int, merge: bool) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if merge:
            fd.merge_proxies_(model)
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("merge", list(MERGES))
@pytest.mark.parametrize("backend", ["auto", "te"])
def test_falqon_tiny_model_training_on_cuda_bf16(backend, merge):
    _needs_fp8_hardware(backend)
    model, batch = _tiny_model_and_batch()
    reference = copy.deepcopy(model)
    names = prepare_model(model, fd.FalqonConfig(rank=16, backend=backend, **MERGES[merge]))
    prepare_model(reference, fd.FalqonConfig(rank=16, backend="emulated", **MERGES[merge]))
    layers = fd.falqon_layers(model)
    assert len(layers) == len(names) > 0
    expected = "scaled_mm" if backend == "auto" else backend
    assert all(fp8.resolve_backend(layer.backend, CUDA).name == expected for _, layer in layers)
    assert all(
        layer.scale.dtype == torch.float32 and layer.B.dtype == torch.bfloat16
        for _, layer in layers
    )
    with torch.no_grad():
        loss_scaled = float(model(**batch, use_cache=False).loss)
        loss_emulated = float(reference(**batch, use_cache=False).loss)
    assert abs(loss_scaled - loss_emulated) < 2e-2, (loss_scaled, loss_emulated)

    before = {name: layer.qweight.clone() for name, layer in layers}
    losses = _overfit(model, batch, lr=0.1, steps=30, merge=True)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-5:]) < losses[0] - 0.1, losses
    if merge == "paper":
        assert all(not layer.B.any() for _, layer in layers)  # zeroed by every merge
    else:  # B holds only the carry: what rounding dropped, below one FP8 step of the weights
        assert all(torch.isfinite(layer.B).all() for _, layer in layers) and any(
            layer.B.any() for _, layer in layers
        )
    assert any(not torch.equal(layer.qweight, before[name]) for name, layer in layers)


def test_fp8_lora_tiny_model_training_on_cuda_bf16():
    _needs_fp8_hardware()
    model, batch = _tiny_model_and_batch()
    names = prepare_model(model, Fp8LoraConfig(rank=16, backend="auto"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)
    assert len(trainable) == 2 * len(names)
    losses = _overfit(model, batch, lr=3e-3, steps=30, merge=False)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-5:]) < losses[0] - 0.1, losses
