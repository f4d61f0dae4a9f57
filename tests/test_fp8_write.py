"""KV-cache write path: FP8 "DeepSeek V3.2 3-buffer" rows (656 bytes a token) and the bf16 paged
append. The byte layout is checked by a few-line reader written here (independent of both the
kernels and ``openmla.reference``); codes and scales must equal the torch reference quantiser's
bit for bit; the round-trip error bound of ``openmla.fp8`` is checked on wide-ranging values;
appends touch exactly the rows at their slots.

CPU runs go through Triton's interpreter (N <= 64 tokens); the ``gpu`` tests repeat the byte
comparisons at realistic sizes on compiled kernels."""

from __future__ import annotations

import struct

import pytest
import torch

from openmla import (
    DS_MLA_BYTES,
    FP8_MAX,
    append_paged_kv,
    append_paged_kv_ds_mla,
    dequantize_ds_mla,
    quantize_ds_mla,
)
from openmla.reference import dequantize_ds_mla_reference, quantize_ds_mla_reference

FLT_MIN = 2.0**-126
D_CKV, D_KPE = 512, 64


def _tokens(n: int, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
            exp_range: tuple[int, int] = (-20, 20)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens whose 128-channel groups have magnitudes 2**k, k uniform in exp_range, some
    elements pushed 2**8 below their group's (small codes, subnormal fp8)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(exp_range[0], exp_range[1] + 1, (n, 4, 1), generator=g).float()
    x = torch.randn(n, 4, 128, generator=g) * torch.exp2(k)
    x = torch.where(torch.rand(n, 4, 128, generator=g) < 0.1, x * 2.0**-8, x)
    kpe = torch.randn(n, D_KPE, generator=g) * 3.0
    return x.view(n, D_CKV).to(dtype).to(device), kpe.to(dtype).to(device)


def _read_row(row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Independent reader of one 656-byte row: (fp8 values [512], scales [4], rope [64]), float32."""
    row = row.cpu()
    fp8 = row[:512].clone().view(torch.float8_e4m3fn).float()
    scales = row[512:528].clone().view(torch.float32)
    rope = row[528:656].clone().view(torch.bfloat16).float()
    return fp8, scales, rope


def _round_trip_bound(x: torch.Tensor, scale_per_channel: torch.Tensor) -> torch.Tensor:
    """|x - deq(q(x))| bound of openmla.fp8: max(2**-4 |x|, 2**-10 s) + 2**-22 (|x| + s)."""
    ax = x.abs()
    return torch.maximum(ax * 2.0**-4, scale_per_channel * 2.0**-10) + 2.0**-22 * (ax + scale_per_channel)


# ---------------------------------------------------------------------------------------------
# Format and numerics


def test_constants() -> None:
    assert DS_MLA_BYTES == 656 == 512 + 4 * 4 + 64 * 2
    assert FP8_MAX == 448.0 == torch.finfo(torch.float8_e4m3fn).max


def test_byte_layout(device: torch.device) -> None:
    ckv, kpe = _tokens(8, device)
    q = quantize_ds_mla(ckv, kpe)
    assert q.dtype == torch.uint8 and q.shape == (8, DS_MLA_BYTES) and q.device.type == device.type
    x = ckv.float().cpu()
    for t in range(8):
        fp8, scales, rope = _read_row(q[t])
        # scales: four little-endian float32 at bytes [512, 528), amax / 448 of each group
        assert list(scales) == list(struct.unpack("<4f", bytes(q[t, 512:528].cpu().tolist())))
        amax = x[t].view(4, 128).abs().amax(-1)
        assert torch.equal(scales, torch.clamp(amax / 448.0, min=FLT_MIN))
        # codes: round-to-nearest-even of x / scale, as e4m3fn
        y = x[t].view(4, 128) / scales[:, None]
        assert torch.equal(fp8, y.to(torch.float8_e4m3fn).float().view(512))
        assert fp8.abs().max() <= 448.0
        # rope: bf16 bits, unchanged
        assert torch.equal(rope, kpe[t].float().cpu())
        # value = fp8 * scale[channel // 128]
        deq = fp8 * scales.repeat_interleave(128)
        assert (deq - x[t]).abs().le(_round_trip_bound(x[t], scales.repeat_interleave(128))).all()


@pytest.mark.parametrize("pow2_scale", [False, True], ids=["amax", "pow2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matches_reference_bytes(dtype: torch.dtype, pow2_scale: bool, device: torch.device) -> None:
    # fp16 holds magnitudes up to 65504: keep the groups' scale within it
    ckv, kpe = _tokens(48, device, dtype, seed=1, exp_range=(-60, 60) if dtype == torch.bfloat16 else (-8, 12))
    kpe = (kpe.float() * 1.37).to(dtype)  # fp16 rope values that bf16 must round
    # 16-bit subnormals (bf16 below 2**-126, fp16 below 2**-14) in a group of their own and in rope
    tiny = 2.0**-130 if dtype == torch.bfloat16 else 2.0**-20
    ckv[0, :128] = (torch.arange(128, device=device) - 64).to(dtype) * tiny
    ckv[1, 200] = -3 * tiny
    kpe[0, :8] = (torch.arange(8, device=device) - 4).to(dtype) * tiny
    q = quantize_ds_mla(ckv, kpe, pow2_scale=pow2_scale)
    ref = quantize_ds_mla_reference(ckv.cpu(), kpe.cpu(), pow2_scale=pow2_scale)
    assert torch.equal(q.cpu(), ref)


def test_rounding_ties_subnormals_and_saturation(device: torch.device) -> None:
    """Every finite e4m3 value, every midpoint between neighbours (ties go to the even code) and
    a value just either side of each midpoint, with 448 in every group so that the scale is 1
    and ckv / scale is exact."""
    pos = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mid = (pos[:-1] + pos[1:]) / 2
    nudge = (pos[1:] - pos[:-1]) / 16
    vals = torch.cat([pos, mid, mid - nudge, mid + nudge])
    vals = torch.cat([vals, -vals])  # 1016 values, all exact in bf16
    per_group = 127
    groups = -(-vals.numel() // per_group)
    x = torch.zeros(groups, 128)
    x[:, 0] = 448.0
    flat = torch.cat([vals, torch.zeros(groups * per_group - vals.numel())])
    x[:, 1:] = flat.view(groups, per_group)
    n = -(-groups // 4)
    x = torch.cat([x, torch.zeros(n * 4 - groups, 128)]).view(n, 512)
    x[:, ::128] = 448.0
    ckv = x.to(torch.bfloat16)
    assert torch.equal(ckv.float(), x)
    kpe = torch.zeros(n, D_KPE, dtype=torch.bfloat16)
    q = quantize_ds_mla(ckv.to(device), kpe.to(device)).cpu()
    assert torch.equal(q[:, 512:528].clone().view(torch.float32), torch.ones(n, 4))
    expected = x.to(torch.float8_e4m3fn).view(torch.uint8)  # torch: round to nearest even
    assert torch.equal(q[:, :512], expected)
    # spot checks of the rule itself
    assert float(torch.tensor(1.0625).to(torch.float8_e4m3fn).float()) == 1.0  # tie -> even
    assert float(torch.tensor(17.0).to(torch.float8_e4m3fn).float()) == 16.0


def test_saturation_of_rounded_quotients(device: torch.device) -> None:
    """amax / scale may round above 448 in float32: codes saturate at 448, never NaN (0x7F)."""
    g = torch.Generator().manual_seed(5)
    ckv = (torch.rand(64, 512, generator=g) * 2 - 1) * torch.exp2(torch.randint(-30, 30, (64, 1), generator=g))
    ckv = ckv.to(torch.bfloat16)
    q = quantize_ds_mla(ckv.to(device), torch.zeros(64, D_KPE, dtype=torch.bfloat16, device=device)).cpu()
    codes = q[:, :512]
    assert not ((codes & 0x7F) == 0x7F).any()
    assert ((codes & 0x7F) == 0x7E).any()  # every group's amax lands on +-448


@pytest.mark.parametrize("pow2_scale", [False, True], ids=["amax", "pow2"])
def test_round_trip_bound(pow2_scale: bool, device: torch.device) -> None:
    ckv, kpe = _tokens(64, device, seed=2, exp_range=(-120, 120))
    q = quantize_ds_mla(ckv, kpe, pow2_scale=pow2_scale)
    deq_ckv, deq_kpe = dequantize_ds_mla(q, dtype=torch.float32)
    ref_ckv, ref_kpe = dequantize_ds_mla_reference(q.cpu())
    assert torch.equal(deq_ckv.cpu(), ref_ckv) and torch.equal(deq_kpe.cpu(), ref_kpe)
    assert torch.equal(deq_kpe.cpu(), kpe.float().cpu())
    x = ckv.float().cpu()
    s = q.cpu()[:, 512:528].clone().view(torch.float32).repeat_interleave(128, dim=1)
    err = (ref_ckv - x).abs()
    assert torch.isfinite(ref_ckv).all()
    assert err.le(_round_trip_bound(x, s)).all()
    # the bound is tight: normal-range elements reach a relative error close to 2**-4
    normal = x.abs() >= s * 2.0**-6
    assert (err[normal] / x.abs()[normal]).max() > 2.0**-5
    # bf16 output: the float32 value rounded to nearest even
    deq_bf16, kpe_bf16 = dequantize_ds_mla(q)
    assert deq_bf16.dtype == torch.bfloat16 and torch.equal(deq_bf16.cpu(), ref_ckv.to(torch.bfloat16))
    assert torch.equal(kpe_bf16.cpu(), kpe.cpu())


def test_pow2_scales(device: torch.device) -> None:
    ckv, kpe = _tokens(32, device, seed=3, exp_range=(-100, 100))
    q = quantize_ds_mla(ckv, kpe, pow2_scale=True).cpu()
    scales = q[:, 512:528].clone().view(torch.float32)
    mant, _ = torch.frexp(scales)
    assert (mant == 0.5).all()  # powers of two
    floor = torch.clamp(ckv.float().cpu().view(-1, 4, 128).abs().amax(-1) / 448.0, min=FLT_MIN)
    assert (scales >= floor).all() and (scales < 2 * floor).all()


def test_zero_and_tiny_groups(device: torch.device) -> None:
    """All-zero groups (+0 and -0) store the scale floor 2**-126 and zero codes: exact zeros, no
    NaN; groups far below 448 * 2**-126 use the floor too and stay within the bound."""
    ckv, kpe = _tokens(6, device, seed=4)
    ckv[0] = 0.0
    ckv[1, 128:256] = 0.0
    ckv[2, 256:384] = -0.0
    ckv[3, :128] = 2.0**-133  # smallest bf16 subnormal
    ckv[3, 5] = -(2.0**-120)
    for pow2_scale in (False, True):
        q = quantize_ds_mla(ckv, kpe, pow2_scale=pow2_scale).cpu()
        scales = q[:, 512:528].clone().view(torch.float32)
        assert scales[0].eq(FLT_MIN).all() and scales[1, 1] == FLT_MIN and scales[2, 2] == FLT_MIN
        assert scales[3, 0] == FLT_MIN
        assert torch.isfinite(scales).all() and (scales > 0).all()
        for dtype in (torch.float32, torch.bfloat16):
            deq, _ = dequantize_ds_mla(q.to(device), dtype=dtype)
            deq = deq.float().cpu()
            assert not torch.isnan(deq).any()
            assert deq[0].eq(0).all() and deq[1, 128:256].eq(0).all() and deq[2, 256:384].eq(0).all()
        assert torch.equal(q, quantize_ds_mla_reference(ckv.cpu(), kpe.cpu(), pow2_scale))
        ref, _ = dequantize_ds_mla_reference(q)
        x = ckv.float().cpu()
        assert (ref - x).abs().le(_round_trip_bound(x, scales.repeat_interleave(128, dim=1))).all()


def test_dequantize_every_code_and_leading_shape(device: torch.device) -> None:
    """All 256 codes (0x7F / 0xFF are NaN) with arbitrary scales, rows in a [2, 3, 656] cache."""
    g = torch.Generator().manual_seed(6)
    kv = torch.randint(0, 256, (2, 3, DS_MLA_BYTES), generator=g, dtype=torch.uint8)
    kv[..., :512] = torch.arange(512).remainder(256).to(torch.uint8)
    scales = torch.exp2(torch.randint(-20, 20, (2, 3, 4), generator=g).float()) * 1.375
    scales.view(torch.int32)[1, 2, 3] = 0x7FFFFFFF  # a NaN whose bf16 rounding would carry into the sign
    kv[..., 512:528] = scales.view(torch.uint8)
    kv[..., 528:] = (torch.randn(2, 3, 64, generator=g)).to(torch.bfloat16).view(torch.uint8)
    ref_ckv, ref_kpe = dequantize_ds_mla_reference(kv)
    for dtype in (torch.float32, torch.bfloat16):
        ckv, kpe = dequantize_ds_mla(kv.to(device), dtype=dtype)
        assert ckv.shape == (2, 3, 512) and kpe.shape == (2, 3, 64) and ckv.dtype == kpe.dtype == dtype
        torch.testing.assert_close(ckv.cpu(), ref_ckv.to(dtype), rtol=0, atol=0, equal_nan=True)
        assert torch.equal(kpe.cpu(), ref_kpe.to(dtype))
    assert torch.isnan(ref_ckv[..., 0x7F]).all() and torch.isnan(ref_ckv[..., 0xFF]).all()
    assert torch.isnan(ref_ckv[1, 2, 384:]).all()
    # a single row and an unaligned slice of a byte buffer
    buf = torch.cat([torch.zeros(2, dtype=torch.uint8), kv[0, 0]]).to(device)
    ckv, _ = dequantize_ds_mla(buf[2:], dtype=torch.float32)
    torch.testing.assert_close(ckv.cpu(), ref_ckv[0, 0], rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Appends into paged caches


def _slots(n: int, num_slots: int, dtype: torch.dtype, seed: int, num_skipped: int) -> torch.Tensor:
    """n shuffled distinct slots of [0, num_slots), num_skipped of them replaced by -1 / -7."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_slots, generator=g)[:n]
    skip = torch.randperm(n, generator=g)[:num_skipped]
    slots[skip] = torch.tensor([-1, -7]).repeat(num_skipped)[:num_skipped]
    return slots.to(dtype)


def _sentinel(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8).view(dtype).view(shape)


def _flat_rows(cache: torch.Tensor) -> torch.Tensor:
    return cache.reshape(-1, cache.shape[-1])


@pytest.mark.parametrize("page_size", [1, 3, 16, 64])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_append_ds_mla(page_size: int, slot_dtype: torch.dtype, device: torch.device) -> None:
    n = 40
    num_pages = -(-(n + 9) // page_size) + 1
    ckv, kpe = _tokens(n, device, seed=page_size)
    slots = _slots(n, num_pages * page_size, slot_dtype, seed=page_size, num_skipped=5)
    cache = _sentinel((num_pages, page_size, DS_MLA_BYTES), torch.uint8, seed=7).to(device)
    before = cache.clone()
    inputs = [t.clone() for t in (ckv, kpe, slots)]
    append_paged_kv_ds_mla(ckv, kpe, slots.to(device), cache, pow2_scale=page_size == 3)
    for t, t0 in zip((ckv, kpe, slots), inputs, strict=True):
        assert torch.equal(t, t0)
    expected = _flat_rows(before).clone()
    keep = slots >= 0
    rows = quantize_ds_mla_reference(ckv.cpu(), kpe.cpu(), pow2_scale=page_size == 3)
    expected[slots[keep].long().to(device)] = rows[keep].to(device)
    assert torch.equal(_flat_rows(cache), expected)  # written rows exact, the rest bit-identical


def test_append_ds_mla_strided_cache(device: torch.device) -> None:
    """A cache that is every other page-sized slab of a larger buffer (page stride 2x)."""
    page_size, num_pages, n = 4, 5, 12
    big = _sentinel((num_pages, 2, page_size, DS_MLA_BYTES), torch.uint8, seed=8).to(device)
    before = big.clone()
    cache = big[:, 1]
    assert not cache.is_contiguous()
    ckv, kpe = _tokens(n, device, seed=9)
    slots = _slots(n, num_pages * page_size, torch.int64, seed=9, num_skipped=2).to(device)
    append_paged_kv_ds_mla(ckv, kpe, slots, cache)
    assert torch.equal(big[:, 0], before[:, 0])
    expected = _flat_rows(before[:, 1]).clone()
    keep = slots >= 0
    expected[slots[keep]] = quantize_ds_mla(ckv, kpe)[keep]
    assert torch.equal(_flat_rows(cache), expected)


def test_out_of_range_slots_write_nothing(device: torch.device) -> None:
    page_size, num_pages = 3, 2
    ckv, kpe = _tokens(4, device, seed=10)
    cache = _sentinel((num_pages, page_size, DS_MLA_BYTES), torch.uint8, seed=11).to(device)
    before = cache.clone()
    slots = torch.tensor([6, 100, -1, 2**40], device=device)
    append_paged_kv_ds_mla(ckv, kpe, slots, cache)
    assert torch.equal(cache, before)
    ckv_cache = _sentinel((num_pages, page_size, D_CKV), torch.bfloat16, seed=12).to(device)
    kpe_cache = _sentinel((num_pages, page_size, D_KPE), torch.bfloat16, seed=13).to(device)
    ckv_before, kpe_before = ckv_cache.clone(), kpe_cache.clone()
    append_paged_kv(ckv, kpe, slots, ckv_cache, kpe_cache)
    assert torch.equal(ckv_cache.view(torch.int16), ckv_before.view(torch.int16))
    assert torch.equal(kpe_cache.view(torch.int16), kpe_before.view(torch.int16))


@pytest.mark.parametrize("page_size", [1, 3, 16, 64])
@pytest.mark.parametrize("layout", ["separate", "packed576"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_append_16bit(page_size: int, layout: str, dtype: torch.dtype, device: torch.device) -> None:
    n = 24
    num_pages = -(-(n + 5) // page_size) + 1
    ckv, kpe = _tokens(n, device, dtype, seed=page_size, exp_range=(-4, 4))
    slot_dtype = torch.int32 if layout == "separate" else torch.int64
    slots = _slots(n, num_pages * page_size, slot_dtype, seed=page_size + 1, num_skipped=3).to(device)
    if layout == "separate":
        ckv_cache = _sentinel((num_pages, page_size, D_CKV), dtype, seed=14).to(device)
        kpe_cache = _sentinel((num_pages, page_size, D_KPE), dtype, seed=15).to(device)
        owners = [ckv_cache, kpe_cache]
    else:
        buf = _sentinel((num_pages, page_size, D_CKV + D_KPE), dtype, seed=16).to(device)
        ckv_cache, kpe_cache = buf[..., :D_CKV], buf[..., D_CKV:]
        owners = [buf]
    before = [o.clone() for o in owners]
    append_paged_kv(ckv, kpe, slots, ckv_cache, kpe_cache)
    keep = slots >= 0
    exp_ckv = _flat_rows(before[0][..., :D_CKV]).clone()
    exp_kpe = _flat_rows(before[-1][..., -D_KPE:]).clone()
    exp_ckv[slots[keep].long()] = ckv[keep]
    exp_kpe[slots[keep].long()] = kpe[keep]
    bits = torch.int16
    assert torch.equal(_flat_rows(ckv_cache).view(bits), exp_ckv.view(bits))
    assert torch.equal(_flat_rows(kpe_cache).view(bits), exp_kpe.view(bits))


def test_append_strided_tokens(device: torch.device) -> None:
    """Token rows may have any stride (here: views into a packed [N, 576] projection)."""
    n, page_size, num_pages = 10, 4, 4
    proj = _tokens(n, device, seed=17)
    packed = torch.cat(proj, dim=1)  # [N, 576]
    ckv, kpe = packed[:, :D_CKV], packed[:, D_CKV:]
    slots = torch.arange(n, device=device).flip(0)
    cache = torch.zeros(num_pages, page_size, DS_MLA_BYTES, dtype=torch.uint8, device=device)
    append_paged_kv_ds_mla(ckv, kpe, slots, cache)
    assert torch.equal(_flat_rows(cache)[:n].flip(0), quantize_ds_mla(ckv.contiguous(), kpe.contiguous()))


def test_empty_batches(device: torch.device) -> None:
    ckv = torch.empty(0, D_CKV, dtype=torch.bfloat16, device=device)
    kpe = torch.empty(0, D_KPE, dtype=torch.bfloat16, device=device)
    assert quantize_ds_mla(ckv, kpe).shape == (0, DS_MLA_BYTES)
    slots = torch.empty(0, dtype=torch.int64, device=device)
    cache = torch.zeros(2, 4, DS_MLA_BYTES, dtype=torch.uint8, device=device)
    append_paged_kv_ds_mla(ckv, kpe, slots, cache)
    append_paged_kv(ckv, kpe, slots, torch.zeros(2, 4, D_CKV, dtype=torch.bfloat16, device=device),
                    torch.zeros(2, 4, D_KPE, dtype=torch.bfloat16, device=device))
    c, k = dequantize_ds_mla(torch.empty(0, 3, DS_MLA_BYTES, dtype=torch.uint8, device=device))
    assert c.shape == (0, 3, D_CKV) and k.shape == (0, 3, D_KPE)
    assert not cache.any()


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError naming the argument, before anything is written


def _bad_calls():
    bf = torch.bfloat16
    ckv = torch.zeros(4, D_CKV, dtype=bf)
    kpe = torch.zeros(4, D_KPE, dtype=bf)
    slots = torch.arange(4)
    cache = torch.zeros(2, 4, DS_MLA_BYTES, dtype=torch.uint8)
    ckv_c = torch.zeros(2, 4, D_CKV, dtype=bf)
    kpe_c = torch.zeros(2, 4, D_KPE, dtype=bf)
    meta = torch.device("meta")
    q = quantize_ds_mla
    a8 = append_paged_kv_ds_mla
    a16 = append_paged_kv
    return [
        ("ckv", TypeError, lambda: q([0], kpe)),
        ("ckv", TypeError, lambda: q(ckv.float(), kpe)),
        ("ckv", ValueError, lambda: q(ckv[:, :256], kpe)),
        ("ckv", ValueError, lambda: q(ckv[None], kpe)),
        ("ckv", ValueError, lambda: q(torch.zeros(D_CKV, 4, dtype=bf).T, kpe)),
        ("kpe", TypeError, lambda: q(ckv, kpe.half())),
        ("kpe", ValueError, lambda: q(ckv, kpe[:3])),
        ("kpe", ValueError, lambda: q(ckv, torch.zeros(4, 32, dtype=bf))),
        ("kpe", ValueError, lambda: q(ckv, kpe.to(meta))),
        ("pow2_scale", TypeError, lambda: q(ckv, kpe, pow2_scale=1)),
        ("slots", TypeError, lambda: a8(ckv, kpe, slots.float(), cache)),
        ("slots", TypeError, lambda: a8(ckv, kpe, slots.to(torch.int16), cache)),
        ("slots", ValueError, lambda: a8(ckv, kpe, slots[:3], cache)),
        ("slots", ValueError, lambda: a8(ckv, kpe, slots[None], cache)),
        ("slots", ValueError, lambda: a8(ckv, kpe, slots.to(meta), cache)),
        ("kv_cache", TypeError, lambda: a8(ckv, kpe, slots, cache.to(torch.int8))),
        ("kv_cache", TypeError, lambda: a8(ckv, kpe, slots, "cache")),
        ("kv_cache", ValueError, lambda: a8(ckv, kpe, slots, cache[..., :576])),
        ("kv_cache", ValueError, lambda: a8(ckv, kpe, slots, cache[0])),
        ("kv_cache", ValueError, lambda: a8(ckv, kpe, slots, cache.to(meta))),
        ("kv_cache", ValueError,
         lambda: a8(ckv, kpe, slots, torch.zeros(2, 4, DS_MLA_BYTES + 1, dtype=torch.uint8)[..., :656])),
        ("kv_cache", ValueError,
         lambda: a8(ckv, kpe, slots, torch.zeros(2, 4, DS_MLA_BYTES * 2, dtype=torch.uint8)[..., ::2])),
        ("pow2_scale", TypeError, lambda: a8(ckv, kpe, slots, cache, pow2_scale=None)),
        ("ckv_cache", TypeError, lambda: a16(ckv, kpe, slots, ckv_c.float(), kpe_c)),
        ("ckv_cache", ValueError, lambda: a16(ckv, kpe, slots, ckv_c[..., :256], kpe_c)),
        ("ckv_cache", ValueError, lambda: a16(ckv, kpe, slots, ckv_c[0], kpe_c)),
        ("ckv_cache", ValueError,
         lambda: a16(ckv, kpe, slots, torch.zeros(2, 4, 2 * D_CKV, dtype=bf)[..., ::2], kpe_c)),
        ("kpe_cache", TypeError, lambda: a16(ckv, kpe, slots, ckv_c, kpe_c.half())),
        ("kpe_cache", ValueError, lambda: a16(ckv, kpe, slots, ckv_c, kpe_c[:1])),
        ("kpe_cache", ValueError, lambda: a16(ckv, kpe, slots, ckv_c, kpe_c.to(meta))),
        ("ckv", TypeError, lambda: a16(ckv.half(), kpe.half(), slots, ckv_c, kpe_c)),
        ("ckv", ValueError, lambda: a16(ckv.to(meta), kpe, slots, ckv_c, kpe_c)),
        ("kpe", ValueError, lambda: a16(ckv, kpe[:2], slots, ckv_c, kpe_c)),
        ("slots", ValueError, lambda: a16(ckv, kpe, slots[:2], ckv_c, kpe_c)),
        ("kv", TypeError, lambda: dequantize_ds_mla(cache.to(torch.int8))),
        ("kv", TypeError, lambda: dequantize_ds_mla(None)),
        ("kv", ValueError, lambda: dequantize_ds_mla(cache[..., :655])),
        ("dtype", TypeError, lambda: dequantize_ds_mla(cache, dtype=torch.float16)),
    ]


def test_bad_inputs_name_the_argument() -> None:
    for name, exc, call in _bad_calls():
        with pytest.raises(exc, match=rf"^{name}\b"):
            call()


def test_failed_append_writes_nothing() -> None:
    ckv = torch.ones(4, D_CKV, dtype=torch.bfloat16)
    kpe = torch.ones(4, D_KPE, dtype=torch.bfloat16)
    cache = torch.zeros(2, 4, DS_MLA_BYTES, dtype=torch.uint8)
    with pytest.raises(ValueError, match="^slots"):
        append_paged_kv_ds_mla(ckv, kpe, torch.arange(3), cache)
    assert not cache.any()


# ---------------------------------------------------------------------------------------------
# GPU: compiled kernels at serving sizes, bit for bit against the torch reference

CUDA = torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("pow2_scale", [False, True], ids=["amax", "pow2"])
def test_gpu_quantize_and_append_match_reference(pow2_scale: bool) -> None:
    n, page_size, num_pages = 4096, 64, 96
    ckv, kpe = _tokens(n, CUDA, seed=20, exp_range=(-120, 120))
    ckv[7] = 0.0
    ref = quantize_ds_mla_reference(ckv, kpe, pow2_scale=pow2_scale)
    assert torch.equal(quantize_ds_mla(ckv, kpe, pow2_scale=pow2_scale), ref)
    slots = _slots(n, num_pages * page_size, torch.int64, seed=21, num_skipped=64).to(CUDA)
    cache = _sentinel((num_pages, page_size, DS_MLA_BYTES), torch.uint8, seed=22).to(CUDA)
    expected = _flat_rows(cache).clone()
    keep = slots >= 0
    expected[slots[keep]] = ref[keep]
    append_paged_kv_ds_mla(ckv, kpe, slots.int(), cache, pow2_scale=pow2_scale)
    torch.cuda.synchronize()
    assert torch.equal(_flat_rows(cache), expected)
    deq, deq_kpe = dequantize_ds_mla(cache, dtype=torch.float32)
    ref_ckv, ref_kpe = dequantize_ds_mla_reference(cache)
    torch.testing.assert_close(deq, ref_ckv, rtol=0, atol=0, equal_nan=True)  # sentinel rows hold NaNs
    torch.testing.assert_close(deq_kpe, ref_kpe, rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
def test_gpu_append_16bit() -> None:
    n, page_size, num_pages = 4096, 64, 80
    ckv, kpe = _tokens(n, CUDA, seed=23, exp_range=(-4, 4))
    buf = torch.zeros(num_pages, page_size, D_CKV + D_KPE, dtype=torch.bfloat16, device=CUDA)
    slots = _slots(n, num_pages * page_size, torch.int32, seed=24, num_skipped=10).to(CUDA)
    append_paged_kv(ckv, kpe, slots, buf[..., :D_CKV], buf[..., D_CKV:])
    keep = slots >= 0
    expected = torch.zeros_like(buf).view(-1, D_CKV + D_KPE)
    expected[slots[keep].long()] = torch.cat([ckv, kpe], dim=1)[keep]
    assert torch.equal(buf.view(-1, D_CKV + D_KPE), expected)
