"""The every-row merge as ONE Triton kernel: each FP8 byte of W read once and written once.

A program takes ``BLOCK_M`` W rows and walks their columns in blocks of ``BLOCK_N``. Per block:

    u = B_rows · A_q[:, cols]               fp32 dot (``ieee``), in registers (K = rank)
    w = decode(W bytes) ; t = w + u          one byte read per element
    new = Q(clamp(t, ±448)) | keep if t is not finite ; one byte written per element
    r = (clamp(t) − new)  (0 if clamped / non-finite) ; carry_rows += r · P[cols, :]   (fp32 dot)

so the update and the residual never touch memory: ~2 bytes per backbone element, plus B's rows,
A_q and P, which every program reads (r·in·4 B each, from L2). The E4M3 encode and decode are
written with integer bit operations (round to nearest even, or the stochastic rounding of
:func:`falqon_dist.method.rounding.stochastic_round_e4m3` with the same counter hash), so the
kernel's bytes do not depend on a hardware conversion instruction and are the same under Triton's
CPU interpreter (``TRITON_INTERPRET=1``, how the tests check them) as on a GPU. The bytes equal the
torch tiles' (:mod:`falqon_dist.method.every_row`) wherever the fp32 update does: both compute
each element as an fp32 multiply-add chain over ``k``. The carry sums per column block, so it
agrees with the reference to fp32 rounding.

Counts are per program (int32) and summed afterwards; nothing is atomic, so the kernel is
deterministic (replicas under ZeRO 0–2 must write the same carry).
"""

from __future__ import annotations

import torch

from falqon_dist.method.rounding import Rounding, noise_keys

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

#: Rows and columns per program's block (tl.dot needs each ≥ 16).
BLOCK_M, BLOCK_N = 32, 64


def available() -> bool:
    """Whether Triton is installed (the kernel then serves CUDA tensors, or any under the interpreter)."""
    return triton is not None


def require() -> None:
    """Raise a clear error where the kernel cannot run."""
    if triton is None:
        raise RuntimeError(
            "the Triton merge kernel needs the `triton` package (pip install triton); "
            "without it the merge runs as torch tiles (set_merge_kernel('auto') or 'torch')"
        )


def _int32(key: int) -> int:
    """A 32-bit key as the signed int32 a kernel argument carries (bit-cast back inside)."""
    return key - (1 << 32) if key >= 1 << 31 else key


if triton is not None:

    @triton.jit
    def _hash32(x):
        """lowbias32 on uint32 (wrapping multiplies), as :func:`falqon_dist.method.rounding._hash32`."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _decode_e4m3(code):
        """E4M3 bits (int32 in [0, 255]) to float32, exactly; 0x7F/0xFF are NaN."""
        magnitude = code & 0x7F
        exponent = magnitude >> 3
        mantissa = magnitude & 7
        normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
        value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)
        value = tl.where(magnitude == 0x7F, float("nan"), value)
        return tl.where(code >= 128, -value, value)

    @triton.jit
    def _floor_code(magnitude):
        """The largest E4M3 code whose value is ≤ ``magnitude`` (finite, 0 ≤ magnitude ≤ 448)."""
        bits = magnitude.to(tl.uint32, bitcast=True)
        normal = (bits >> 20).to(tl.int32) - 960  # fp32 exponent bias 127, E4M3 7: (127 − 7) << 3
        subnormal = (magnitude * 512.0).to(tl.int32)  # multiples of 2^-9
        return tl.where(magnitude >= 0.015625, normal, subnormal)

    @triton.jit
    def _nearest_code(value):
        """Round finite ``value`` (|value| ≤ 448) to E4M3 bits, to nearest even (torch's cast)."""
        bits = value.to(tl.uint32, bitcast=True)
        magnitude_bits = bits & 0x7FFFFFFF
        normal = ((magnitude_bits + 0x7FFFF + ((magnitude_bits >> 20) & 1)) >> 20).to(
            tl.int32
        ) - 960
        scaled = tl.abs(value) * 512.0
        whole = scaled.to(tl.int32)
        fraction = scaled - whole.to(tl.float32)
        up = (fraction > 0.5) | ((fraction == 0.5) & ((whole & 1) == 1))
        subnormal = whole + up.to(tl.int32)
        code = tl.where(tl.abs(value) >= 0.015625, normal, subnormal)
        return code | ((bits >> 31).to(tl.int32) << 7)

    @triton.jit
    def _stochastic_code(value, noise):
        """``value`` to E4M3 bits, up with probability equal to the fraction of the step below it.

        As the reference: ``fraction = (|v| − lo)/(hi − lo)``; the step is a power of two, so
        ``noise < fraction`` is ``noise·step < |v| − lo`` exactly; the sign is ``v < 0``.
        """
        magnitude = tl.abs(value)
        lo_code = _floor_code(magnitude)
        hi_code = tl.minimum(lo_code + 1, 0x7E)
        lo = _decode_e4m3(lo_code)
        step = _decode_e4m3(hi_code) - lo
        code = tl.where(noise * step < magnitude - lo, hi_code, lo_code)
        return code | ((value < 0).to(tl.int32) << 7)

    @triton.jit(do_not_specialize=["key_lo", "key_hi"])
    def _every_row_kernel(
        flat_ptr,
        offset,
        lo,
        hi,
        proxy_ptr,
        adapter_ptr,
        projector_ptr,
        carry_ptr,
        counts_ptr,
        out_features,
        in_features,
        rank,
        first_row,
        last_row,
        key_lo,
        key_hi,
        STOCHASTIC: tl.constexpr,
        CARRY: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        RANK_PAD: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = first_row + pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows <= last_row
        ks = tl.arange(0, RANK_PAD)
        k_ok = ks < rank
        proxy = tl.load(
            proxy_ptr + rows[:, None] * rank + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        key_lo_u = key_lo.to(tl.uint32, bitcast=True)
        key_hi_u = key_hi.to(tl.uint32, bitcast=True)
        carry = tl.zeros((BLOCK_M, RANK_PAD), dtype=tl.float32)
        saturated = tl.zeros((), dtype=tl.int32)
        nonfinite = tl.zeros((), dtype=tl.int32)
        changed = tl.zeros((), dtype=tl.int32)
        elements = tl.zeros((), dtype=tl.int32)
        for col0 in range(0, in_features, BLOCK_N):
            cols = col0 + tl.arange(0, BLOCK_N)
            col_ok = cols < in_features
            adapter = tl.load(
                adapter_ptr + ks[:, None] * in_features + cols[None, :],
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            update = tl.dot(proxy, adapter, input_precision="ieee")
            index = rows[:, None].to(tl.int64) * in_features + cols[None, :]  # element of M_q
            owned = row_ok[:, None] & col_ok[None, :] & (index >= lo) & (index < hi)
            old_code = tl.load(flat_ptr + (index - offset), mask=owned, other=0).to(tl.int32)
            target = _decode_e4m3(old_code) + update
            finite = tl.abs(target) <= 3.4028234663852886e38  # false for NaN and ±inf
            clamped = finite & (tl.abs(target) > 448.0)
            updated = tl.where(
                finite, tl.minimum(tl.maximum(target, -448.0), 448.0), _decode_e4m3(old_code)
            )
            if STOCHASTIC:
                mixed = _hash32((index & 0xFFFFFFFF).to(tl.uint32) ^ key_lo_u)
                mixed = _hash32(mixed ^ (index >> 32).to(tl.uint32) ^ key_hi_u)
                noise = (mixed >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
                new_code = _stochastic_code(updated, noise)
            else:
                new_code = _nearest_code(updated)
            tl.store(flat_ptr + (index - offset), new_code.to(tl.uint8), mask=owned)
            saturated += tl.sum((clamped & owned).to(tl.int32))
            nonfinite += tl.sum((~finite & owned).to(tl.int32))
            changed += tl.sum(((new_code != old_code) & owned).to(tl.int32))
            elements += tl.sum(owned.to(tl.int32))
            if CARRY:
                residual = tl.where(
                    finite & ~clamped & owned, updated - _decode_e4m3(new_code), 0.0
                )
                projector = tl.load(
                    projector_ptr + cols[:, None] * rank + ks[None, :],
                    mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                carry = tl.dot(residual, projector, carry, input_precision="ieee")
        if CARRY:
            carry = tl.where(tl.abs(carry) <= 3.4028234663852886e38, carry, 0.0)
            tl.store(
                carry_ptr + rows[:, None] * rank + ks[None, :],
                carry,
                mask=row_ok[:, None] & k_ok[None, :],
            )
        tl.store(counts_ptr + pid * 4 + 0, saturated)
        tl.store(counts_ptr + pid * 4 + 1, nonfinite)
        tl.store(counts_ptr + pid * 4 + 2, changed)
        tl.store(counts_ptr + pid * 4 + 3, elements)


def merge_every_row_(
    flat: torch.Tensor,
    offset: int,
    lo: int,
    hi: int,
    proxy: torch.Tensor,
    adapter_q: torch.Tensor,
    rounding: Rounding,
    projector: torch.Tensor | None,
) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...]]:
    """Run the kernel over the W elements ``[lo, hi)`` of ``M_q`` that ``flat`` (from ``offset``)
    holds: the same contract as the torch tiles of :mod:`falqon_dist.method.every_row`. Returns the
    carry (out × r, float32; the slice's partial projection) or None, and the counts (saturated,
    nonfinite, changed, elements) as 0-dim int64 device tensors. One launch, no host sync."""
    require()
    out, rank = proxy.shape
    in_features, device = adapter_q.shape[1], flat.device
    first, last = lo // in_features, (hi - 1) // in_features
    programs = triton.cdiv(last - first + 1, BLOCK_M)
    counts = torch.empty(programs, 4, dtype=torch.int32, device=device)
    carry = (
        torch.zeros(out, rank, dtype=torch.float32, device=device)
        if projector is not None
        else None
    )
    key_lo, key_hi = noise_keys(rounding.seed, rounding.step)
    dummy = proxy  # an unused pointer argument (CARRY is off)
    _every_row_kernel[(programs,)](
        flat,
        offset,
        lo,
        hi,
        proxy.contiguous(),
        adapter_q.contiguous(),
        dummy if projector is None else projector.contiguous(),
        dummy if carry is None else carry,
        counts,
        out,
        in_features,
        rank,
        first,
        last,
        _int32(key_lo),
        _int32(key_hi),
        STOCHASTIC=rounding.stochastic,
        CARRY=projector is not None,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        RANK_PAD=max(16, triton.next_power_of_2(rank)),
    )
    totals = counts.sum(dim=0, dtype=torch.int64)
    return carry, tuple(totals.unbind())
