"""KV-cache write path: quantise tokens into the 656-byte FP8 rows, append bf16 tokens, and
dequantise FP8 rows back (tests, debugging).

FP8 row (DeepSeek V3.2 "3-buffer" layout, byte-compatible with FlashMLA / vLLM ``fp8_ds_mla``)::

    bytes [  0, 512)  ckv as float8 e4m3fn codes
    bytes [512, 528)  four float32 scales; scale j covers ckv channels [128 j, 128 j + 128)
    bytes [528, 656)  kpe, 64 bf16 values

    scale_j = max(amax_j / 448, FLT_MIN)          (amax over |ckv| of the group, fp32)
    scale_j = 2 ** ceil(log2(scale_j))            (only with POW2)
    code    = e4m3_rne(clamp(ckv / scale_j, -448, 448))

``FLT_MIN`` (2**-126, the smallest normal float32) is vLLM's floor: an all-zero group stores
that scale and zero codes, so it dequantises to exact zeros, and no scale is ever 0, subnormal,
NaN or inf (a reader that divides by it stays finite).

Why the conversions are done by hand, with integer arithmetic on the float32 bits:
Triton's interpreter converts float32 to float8 and to bf16 wrongly (ties round away from zero,
a mantissa carry can corrupt the exponent, no saturation: 500 -> 256, 1.0625 -> 1.125, and about
half of random float32 values land one bf16 ulp off), and it flushes bf16 subnormals to zero when
widening them to float32. The bit arithmetic below (round to nearest even, saturating; bf16 read
as int16 and widened by a shift) gives the same bytes in the interpreter and in compiled Triton,
so the CPU tests check exactly what the GPU runs, and it matches ``torch``'s own conversions bit
for bit.
Divisions use ``tl.math.div_rn`` (IEEE): Triton's ``/`` compiles to an approximate division on
NVIDIA GPUs, which would move codes across rounding ties.

Each field is stored through its own typed pointer: the launcher passes the same cache storage
viewed as uint8 (codes), float32 (scales) and int16 (bf16 bit patterns), and the kernel indexes
each view with the row's byte offset divided by the element size. That needs the page and token
strides to be multiples of 4 bytes (checked by ``openmla.fp8``); 656 itself is a multiple of 16.

Slots: token ``i`` goes to slot ``slots[i] = page * page_size + offset``; a negative slot means
padding (nothing is written). A slot at or beyond ``num_pages * page_size`` is skipped as well, so
a bad slot can never write outside the cache. Two tokens with the same slot race (either wins).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

D_CKV = 512
D_KPE = 64
GROUP = 128  # ckv channels per scale
NUM_GROUPS = D_CKV // GROUP
ROW_BYTES = D_CKV + 4 * NUM_GROUPS + 2 * D_KPE  # 656
SCALE_BYTE = D_CKV  # scales start here
KPE_BYTE = D_CKV + 4 * NUM_GROUPS  # 528: rope starts here

FP8_MAX = tl.constexpr(448.0)
FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # 2**-126


@triton.jit
def _f32_to_bf16_bits(x):
    """Round-to-nearest-even float32 -> bf16 bit pattern (int16); NaN -> 0x7FC0 (as torch).

    NaN needs its own case: the GPU's canonical NaN 0x7FFFFFFF would carry into the sign bit."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # wraps like uint32 for negative x
    return tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded).to(tl.int16)


@triton.jit
def _bf16_bits_to_f32(b):
    """bf16 bit pattern (int16) -> float32, exact."""
    return ((b.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_e4m3_code(y):
    """float32 -> float8 e4m3fn code (int32 in [0, 255]), round to nearest even, saturating at
    +-448; y finite.

    Normal results (|y| >= 2**-6): round the float32 mantissa to 3 bits in place (the carry may
    step the exponent), then rebias the exponent from 127 to 7. Subnormal results (|y| < 2**-6,
    step 2**-9): the code is round(|y| * 2**9) in [0, 8], rounded to nearest even by adding
    2**23 in float32 (whose ulp is 1); 8 is exactly the smallest normal's code.
    """
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    r = mag + 0x7FFFF + ((mag >> 20) & 1)
    normal = (r >> 20) - ((127 - 7) << 3)
    sub = (tl.abs(y) * 512.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    return sign | tl.where(mag >= 0x3C800000, normal, sub)


@triton.jit
def _e4m3_code_to_f32(c):
    """float8 e4m3fn code (int32 in [0, 255]) -> float32, exact; 0x7F / 0xFF give NaN."""
    e = (c >> 3) & 0xF
    m = c & 7
    normal = (((e + (127 - 7)) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)  # subnormal: m * 2**-9
    mag = tl.where((c & 0x7F) == 0x7F, float("nan"), mag)
    return tl.where((c & 0x80) != 0, -mag, mag)


@triton.jit
def _quantize_ds_mla_kernel(
    ckv,
    kpe,
    slots,
    cache_u8,
    cache_f32,
    cache_i16,
    num_slots,
    page_size,
    stride_ckv,
    stride_kpe,
    stride_page,
    stride_tok,
    HAS_SLOTS: tl.constexpr,
    POW2: tl.constexpr,
    IN_BF16: tl.constexpr,
):
    """One program quantises one token: ckv [512] (4 groups x 128) and kpe [64] into one row.
    Without slots, token i goes to row i (page_size 1). With IN_BF16, ckv and kpe are int16 views
    of bf16 tokens (bits widened by hand, rope copied as bits); else fp16 tokens."""
    i_t = tl.program_id(0)
    if HAS_SLOTS:
        slot = tl.load(slots + i_t).to(tl.int64)
    else:
        slot = i_t.to(tl.int64)
    if (slot < 0) | (slot >= num_slots):
        return
    row = (slot // page_size) * stride_page + (slot % page_size) * stride_tok  # byte offset

    o_g = tl.arange(0, 4)
    o_c = tl.arange(0, 128)
    o_gc = o_g[:, None] * 128 + o_c[None, :]  # [4, 128]
    b_x = tl.load(ckv + i_t.to(tl.int64) * stride_ckv + o_gc)
    b_x = _bf16_bits_to_f32(b_x) if IN_BF16 else b_x.to(tl.float32)
    b_amax = tl.max(tl.abs(b_x), 1)  # [4]
    b_scale = tl.maximum(tl.math.div_rn(b_amax, tl.full([4], 448.0, tl.float32)), FLT_MIN)
    if POW2:
        # 2**ceil(log2(s)) for a normal positive s: a non-zero mantissa carries into the exponent.
        b_bits = b_scale.to(tl.int32, bitcast=True)
        b_scale = ((b_bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    b_y = tl.math.div_rn(b_x, tl.broadcast_to(b_scale[:, None], (4, 128)))
    b_code = _f32_to_e4m3_code(b_y)
    tl.store(cache_u8 + row + o_gc, b_code.to(tl.uint8))
    tl.store(cache_f32 + (row + 512) // 4 + o_g, b_scale)

    o_k = tl.arange(0, 64)
    b_pe = tl.load(kpe + i_t.to(tl.int64) * stride_kpe + o_k)
    if not IN_BF16:
        b_pe = _f32_to_bf16_bits(b_pe.to(tl.float32))
    tl.store(cache_i16 + (row + 528) // 2 + o_k, b_pe)


@triton.jit
def _append_kv_kernel(
    ckv,
    kpe,
    slots,
    ckv_cache,
    kpe_cache,
    num_slots,
    page_size,
    stride_ckv,
    stride_kpe,
    stride_ckv_page,
    stride_ckv_tok,
    stride_kpe_page,
    stride_kpe_tok,
):
    """One program copies one token's ckv [512] and kpe [64] into the 16-bit paged caches. All
    four tensors are int16 views (same dtype on both sides): a bit copy, so no conversion of the
    interpreter's can touch the values (it flushes bf16 subnormals on the way through float32)."""
    i_t = tl.program_id(0)
    slot = tl.load(slots + i_t).to(tl.int64)
    if (slot < 0) | (slot >= num_slots):
        return
    page = slot // page_size
    off = slot % page_size
    o_c = tl.arange(0, 512)
    o_k = tl.arange(0, 64)
    b_ckv = tl.load(ckv + i_t.to(tl.int64) * stride_ckv + o_c)
    b_kpe = tl.load(kpe + i_t.to(tl.int64) * stride_kpe + o_k)
    tl.store(ckv_cache + page * stride_ckv_page + off * stride_ckv_tok + o_c, b_ckv)
    tl.store(kpe_cache + page * stride_kpe_page + off * stride_kpe_tok + o_k, b_kpe)


@triton.jit
def _dequantize_ds_mla_kernel(
    kv_u8,
    kv_f32,
    kv_i16,
    ckv_out,
    kpe_out,
    OUT_BF16: tl.constexpr,
):
    """One program dequantises one contiguous 656-byte row into ckv [512] and kpe [64]. With
    OUT_BF16 the outputs are int16 views of bf16 tensors (bits rounded to nearest even by hand),
    else float32 tensors."""
    i_r = tl.program_id(0).to(tl.int64)
    row = i_r * 656
    o_g = tl.arange(0, 4)
    o_gc = o_g[:, None] * 128 + tl.arange(0, 128)[None, :]  # [4, 128]
    b_code = tl.load(kv_u8 + row + o_gc).to(tl.int32)
    b_scale = tl.load(kv_f32 + (row + 512) // 4 + o_g)
    b_x = _e4m3_code_to_f32(b_code) * b_scale[:, None]
    o_k = tl.arange(0, 64)
    b_pe_bits = tl.load(kv_i16 + (row + 528) // 2 + o_k)
    if OUT_BF16:
        tl.store(ckv_out + i_r * 512 + o_gc, _f32_to_bf16_bits(b_x))
        tl.store(kpe_out + i_r * 64 + o_k, b_pe_bits)
    else:
        tl.store(ckv_out + i_r * 512 + o_gc, b_x)
        tl.store(kpe_out + i_r * 64 + o_k, _bf16_bits_to_f32(b_pe_bits))


def _typed_views(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same storage as uint8, float32 and int16 (last dimension reinterpreted)."""
    return cache, cache.view(torch.float32), cache.view(torch.int16)


def launch_quantize_ds_mla(
    *,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    slots: torch.Tensor | None,
    cache: torch.Tensor,
    pow2_scale: bool,
) -> None:
    """Quantise ``ckv [N, 512]`` / ``kpe [N, 64]`` (16-bit, unit last strides) into the rows of
    ``cache`` (uint8 ``[P, page_size, 656]``, unit last stride, page and token strides multiples of
    4) at ``slots [N]`` (int32/int64); ``slots=None`` writes token ``i`` to slot ``i``."""
    n = ckv.shape[0]
    if n == 0:
        return
    num_pages, page_size = cache.shape[0], cache.shape[1]
    u8, f32, i16 = _typed_views(cache)
    in_bf16 = ckv.dtype == torch.bfloat16
    _quantize_ds_mla_kernel[(n,)](
        ckv.view(torch.int16) if in_bf16 else ckv,
        kpe.view(torch.int16) if in_bf16 else kpe,
        slots if slots is not None else ckv,  # unused without slots
        u8,
        f32,
        i16,
        num_pages * page_size,
        page_size,
        ckv.stride(0),
        kpe.stride(0),
        cache.stride(0),
        cache.stride(1),
        HAS_SLOTS=slots is not None,
        POW2=bool(pow2_scale),
        IN_BF16=in_bf16,
        num_warps=4,
    )


def launch_append_kv(
    *,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    slots: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
) -> None:
    """Copy ``ckv [N, 512]`` / ``kpe [N, 64]`` into ``ckv_cache [P, page, 512]`` /
    ``kpe_cache [P, page, 64]`` (same dtype, unit last strides) at ``slots [N]``."""
    n = ckv.shape[0]
    if n == 0:
        return
    num_pages, page_size = ckv_cache.shape[0], ckv_cache.shape[1]
    _append_kv_kernel[(n,)](
        ckv.view(torch.int16),
        kpe.view(torch.int16),
        slots,
        ckv_cache.view(torch.int16),
        kpe_cache.view(torch.int16),
        num_pages * page_size,
        page_size,
        ckv.stride(0),
        kpe.stride(0),
        ckv_cache.stride(0),
        ckv_cache.stride(1),
        kpe_cache.stride(0),
        kpe_cache.stride(1),
        num_warps=4,
    )


def launch_dequantize_ds_mla(*, kv: torch.Tensor, ckv_out: torch.Tensor, kpe_out: torch.Tensor) -> None:
    """Dequantise contiguous rows ``kv [M, 656]`` (uint8) into contiguous ``ckv_out [M, 512]`` /
    ``kpe_out [M, 64]`` (both bf16 or both float32)."""
    m = kv.shape[0]
    if m == 0:
        return
    out_bf16 = ckv_out.dtype == torch.bfloat16
    u8, f32, i16 = _typed_views(kv)
    _dequantize_ds_mla_kernel[(m,)](
        u8,
        f32,
        i16,
        ckv_out.view(torch.int16) if out_bf16 else ckv_out,
        kpe_out.view(torch.int16) if out_bf16 else kpe_out,
        OUT_BF16=out_bf16,
        num_warps=4,
    )
