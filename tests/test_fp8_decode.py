"""Decode over fp8 KV caches: DeepSeek V3.2's 656-byte rows (``kv_data_type=torch.uint8``) and
per-tensor float8 e4m3 (``kv_data_type=torch.float8_e4m3fn`` with ``run(..., kv_scale=)``).

The oracle runs on the dequantised cache (plain torch, ``openmla.reference``): the same error
budget as the 16-bit decode applies. Against the unquantised cache the error is the
quantisation error, checked against the bound documented in DESIGN.md ("FP8 decode")."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl

from openmla import BatchMLAPagedAttentionWrapper
from openmla.kernels.decode import _dequant_kv
from openmla.testing import (
    assert_attention_close,
    make_paged_case,
    run_and_check_ds_mla,
    to_fp8_ds_mla,
    to_fp8_per_tensor,
)

CUDA = torch.device("cuda")
KV_SCALE = 0.0123  # per-tensor scale; not a power of two, so folding it must be exact

# (kv_lens, heads, page, qo_len, causal, splits): empty requests, odd page sizes and head counts,
# MTP with causal masks, direct and split pieces (in-kernel merge and the merge kernel)
CASES = [
    ([5, 70, 0, 33], 3, 16, 1, False, None),
    ([64, 2, 130], 16, 64, 2, True, 3),
    ([37, 0, 9], 20, 3, 1, False, 2),
    ([17, 40], 1, 1, 2, True, None),
    ([200, 3], 16, 64, 1, False, 20),
    ([129, 64, 65], 128, 64, 1, False, 2),
]


def _id(c: tuple) -> str:
    kv, h, page, q, causal, splits = c
    return f"kv{'-'.join(map(str, kv))}-H{h}-P{page}-Q{q}{'-causal' if causal else ''}-S{splits or 'auto'}"


def _case(c: tuple, device: torch.device, dtype: torch.dtype = torch.bfloat16, packed: bool = False):
    kv, heads, page, qo_len, causal, splits = c
    case = make_paged_case(kv, heads, page, qo_len=qo_len, causal=causal, dtype=dtype, device=device,
                           packed=packed, seed=heads * 7 + page)
    return case, splits


def _plan(wrapper, case, kv_dtype, splits) -> None:
    args = list(case.plan_args())
    args[-1] = kv_dtype
    wrapper.plan(*args, num_splits=splits)


@pytest.mark.parametrize("c", CASES, ids=_id)
def test_ds_mla_decode(c: tuple, device: torch.device, workspace: torch.Tensor) -> None:
    case, splits = _case(c, device)
    run_and_check_ds_mla(BatchMLAPagedAttentionWrapper(workspace), case, splits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("c", CASES[:4], ids=_id)
def test_per_tensor_fp8_decode(c: tuple, dtype: torch.dtype, device: torch.device,
                               workspace: torch.Tensor) -> None:
    case, splits = _case(c, device, dtype, packed=dtype == torch.float16)
    ckv8, kpe8, deq = to_fp8_per_tensor(case, KV_SCALE)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    _plan(wrapper, case, torch.float8_e4m3fn, splits)
    out, lse = wrapper.run(case.q_nope, case.q_pe, ckv8, kpe8, return_lse=True, kv_scale=KV_SCALE)
    assert_attention_close(out, lse, deq.reference(), deq.lowp_reference())
    # the scale as a device tensor gives bitwise the same result
    scale_t = torch.tensor([KV_SCALE], dtype=torch.float32, device=device)
    out_t, lse_t = wrapper.run(case.q_nope, case.q_pe, ckv8, kpe8, return_lse=True, kv_scale=scale_t)
    assert torch.equal(out, out_t) and torch.equal(lse, lse_t)
    # a new float value is used (the wrapper's device copy follows it)
    out2, lse2 = wrapper.run(case.q_nope, case.q_pe, ckv8, kpe8, return_lse=True, kv_scale=2 * KV_SCALE)
    deq2 = replace(deq, ckv_cache=ckv8.float() * (2 * KV_SCALE), kpe_cache=kpe8.float() * (2 * KV_SCALE))
    assert_attention_close(out2, lse2, deq2.reference(), deq2.lowp_reference())


@pytest.mark.parametrize("fmt", ["ds_mla", "per_tensor"])
def test_fp8_unaligned_cache(fmt: str, device: torch.device, workspace: torch.Tensor) -> None:
    """Caches off the 16-byte grid (656-byte rows at a base 4 bytes past a 16-byte boundary;
    per-tensor fp8 with a 520-byte token stride): Triton specialises the kernel to narrower
    copies of the fp8 tile (page 64: whole blocks and a partial last block)."""
    case, splits = _case(([64, 200, 45], 16, 64, 1, False, 2), device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    if fmt == "ds_mla":
        kv, deq = to_fp8_ds_mla(case)
        buf = torch.zeros(kv.numel() + 16, dtype=torch.uint8, device=device)
        shift = (4 - buf.data_ptr()) % 16
        kv = buf[shift:shift + kv.numel()].view(kv.shape).copy_(kv)
        assert kv.data_ptr() % 16 == 4
        _plan(wrapper, case, torch.uint8, splits)
        out, lse = wrapper.run(case.q_nope, case.q_pe, kv, None, return_lse=True)
    else:
        ckv8, kpe8, deq = to_fp8_per_tensor(case, KV_SCALE)
        wide = torch.zeros(*ckv8.shape[:2], 520, dtype=torch.uint8, device=device)  # 520-byte token stride
        wide[..., :512] = ckv8.view(torch.uint8)
        ckv8 = wide[..., :512].view(torch.float8_e4m3fn)
        _plan(wrapper, case, torch.float8_e4m3fn, splits)
        out, lse = wrapper.run(case.q_nope, case.q_pe, ckv8, kpe8, return_lse=True, kv_scale=KV_SCALE)
    assert_attention_close(out, lse, deq.reference(), deq.lowp_reference())


@triton.jit
def _dequant_probe(codes, kpe, scales, out_ckv, out_kpe, KV_FORMAT: tl.constexpr, BLOCK_N: tl.constexpr,
                   ASM_CVT: tl.constexpr):
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, 512)
    o_r = tl.arange(0, 64)
    b_ckv = tl.load(codes + o_n[:, None] * 512 + o_c[None, :])
    b_kpe = tl.load(kpe + o_n[:, None] * 64 + o_r[None, :])
    b_sc = tl.load(scales + o_n[:, None] * 4 + tl.arange(0, 4)[None, :])
    b_ckv, b_kpe = _dequant_kv(b_ckv, b_kpe, b_sc, out_ckv.dtype.element_ty, KV_FORMAT, BLOCK_N, 512, False,
                               ASM_CVT)
    tl.store(out_ckv + o_n[:, None] * 512 + o_c[None, :], b_ckv)
    tl.store(out_kpe + o_n[:, None] * 64 + o_r[None, :], b_kpe)


@pytest.mark.gpu
@pytest.mark.parametrize("asm", [True, False], ids=["ptx", "triton"])
@pytest.mark.parametrize("fmt", ["ds_mla", "per_tensor_bf16", "per_tensor_fp16"])
def test_dequant_tiles_exact(fmt: str, asm: bool) -> None:
    """The decode kernel's tile dequantisation, both its PTX (Hopper) and its plain Triton form, is
    bitwise torch's: every e4m3 code but the NaNs (which the quantiser never writes), in every
    position of a tile, widened to bf16 / fp16, or times its group scale in float32 rounded to
    bf16 (scales from the 2**-126 floor to 2**40, powers of two and not)."""
    if asm and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the PTX dequantisation needs sm_90")
    n = 32
    g = torch.Generator().manual_seed(5)
    codes = torch.arange(n * 512, dtype=torch.int64)
    codes = codes + (codes // 256) * 37  # every code, in varying positions
    codes = (codes % 256).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E
    codes = codes.view(n, 512)
    kpe_codes = torch.randint(0, 256, (n, 64), generator=g).to(torch.uint8)
    kpe_codes[(kpe_codes & 0x7F) == 0x7F] = 0
    scales = torch.exp2(torch.empty(n, 4).uniform_(-126, 40, generator=g)).float()
    scales[0] = 2.0**-126
    scales[1] = torch.exp2(torch.randint(-30, 10, (4,), generator=g).float())
    codes8 = codes.view(torch.float8_e4m3fn).cuda()
    kpe8 = kpe_codes.view(torch.float8_e4m3fn).cuda()
    if fmt == "ds_mla":
        kpe_in = torch.randn(n, 64, generator=g).bfloat16().cuda()
        out_dtype, kv_format = torch.bfloat16, 2
        want_ckv = (codes8.float().view(n, 4, 128) * scales.cuda()[:, :, None]).view(n, 512).bfloat16()
        want_kpe = kpe_in
    else:
        kpe_in = kpe8
        out_dtype, kv_format = (torch.bfloat16 if fmt.endswith("bf16") else torch.float16), 1
        want_ckv, want_kpe = codes8.to(out_dtype), kpe8.to(out_dtype)
    out_ckv = torch.empty(n, 512, dtype=out_dtype, device="cuda")
    out_kpe = torch.empty(n, 64, dtype=out_dtype if kv_format == 1 else torch.bfloat16, device="cuda")
    _dequant_probe[(1,)](codes8, kpe_in, scales.cuda(), out_ckv, out_kpe, KV_FORMAT=kv_format, BLOCK_N=n,
                         ASM_CVT=asm)
    assert torch.equal(out_ckv.view(torch.int16), want_ckv.view(torch.int16))
    assert torch.equal(out_kpe.view(torch.int16), want_kpe.view(torch.int16))


def test_ds_mla_quantised_by_our_kernel(device: torch.device, workspace: torch.Tensor) -> None:
    """The write path and the read path agree: a cache filled by append_paged_kv_ds_mla decodes
    like the reference on its dequantised contents."""
    from openmla.fp8 import append_paged_kv_ds_mla
    from openmla.reference import dequantize_ds_mla_reference

    case, _ = _case(([45, 64, 7], 16, 16, 1, False, None), device)
    num_pages, page, _ = case.ckv_cache.shape
    cache = torch.zeros(num_pages, page, 656, dtype=torch.uint8, device=device)
    slots = torch.arange(num_pages * page, device=device)
    append_paged_kv_ds_mla(torch.nan_to_num(case.ckv_cache.reshape(-1, 512)),
                           torch.nan_to_num(case.kpe_cache.reshape(-1, 64)), slots, cache)
    ckv, kpe = dequantize_ds_mla_reference(cache)
    deq = replace(case, ckv_cache=ckv.bfloat16(), kpe_cache=kpe.bfloat16())
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    _plan(wrapper, case, torch.uint8, 2)
    out, lse = wrapper.run(case.q_nope, case.q_pe, cache, None, return_lse=True)
    assert_attention_close(out, lse, deq.reference(), deq.lowp_reference())


def test_fp8_validation(device: torch.device, workspace: torch.Tensor) -> None:
    case, _ = _case(([5, 9], 4, 16, 1, False, None), device)
    kv, _ = to_fp8_ds_mla(case)
    ckv8, kpe8, _ = to_fp8_per_tensor(case, KV_SCALE)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    args = list(case.plan_args())
    with pytest.raises(TypeError, match="q_data_type"):
        wrapper.plan(*args[:-2], torch.float16, torch.uint8)
    with pytest.raises(TypeError, match="kv_data_type"):
        wrapper.plan(*args[:-1], torch.float32)
    _plan(wrapper, case, torch.uint8, None)
    with pytest.raises(ValueError, match="kpe_cache must be None"):
        wrapper.run(case.q_nope, case.q_pe, kv, case.kpe_cache)
    with pytest.raises(ValueError, match="kv_scale"):
        wrapper.run(case.q_nope, case.q_pe, kv, None, kv_scale=1.0)
    with pytest.raises(ValueError, match="ckv_cache must have shape"):
        wrapper.run(case.q_nope, case.q_pe, kv[..., :576], None)
    with pytest.raises(TypeError, match="ckv_cache must have dtype"):
        wrapper.run(case.q_nope, case.q_pe, ckv8, None)
    padded = torch.zeros(*kv.shape[:2], 664, dtype=torch.uint8, device=device)[..., :656]
    padded.copy_(kv)  # token stride 664 bytes: not a multiple of 16
    with pytest.raises(ValueError, match="multiples of 16 bytes"):
        wrapper.run(case.q_nope, case.q_pe, padded, None)
    # run()'s one-pass fast path takes the planned call and declines the cases above
    fast = wrapper._common_call
    assert fast(wrapper._plan, case.q_nope, case.q_pe, kv, None, None, None)
    for bad in ((kv, case.kpe_cache), (kv[..., :576], None), (ckv8, None), (padded, None)):
        assert not fast(wrapper._plan, case.q_nope, case.q_pe, *bad, None, None)
    _plan(wrapper, case, torch.float8_e4m3fn, None)
    with pytest.raises(ValueError, match="kv_scale is required"):
        wrapper.run(case.q_nope, case.q_pe, ckv8, kpe8)
    with pytest.raises(TypeError, match="kv_scale must be"):
        wrapper.run(case.q_nope, case.q_pe, ckv8, kpe8, kv_scale="1")
    with pytest.raises(ValueError, match="kv_scale must hold one element"):
        wrapper.run(case.q_nope, case.q_pe, ckv8, kpe8, kv_scale=torch.ones(2, device=device))
    with pytest.raises(TypeError, match="kpe_cache must have dtype"):
        wrapper.run(case.q_nope, case.q_pe, ckv8, case.kpe_cache, kv_scale=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["ds_mla", "per_tensor"])
@pytest.mark.parametrize("batch, heads, max_kv, page, qo_len", [
    (64, 16, 2048, 64, 1), (16, 128, 2048, 64, 2), (32, 20, 1000, 53, 1), (8, 64, 4096, 16, 2),
])
def test_fp8_realistic(fmt: str, batch: int, heads: int, max_kv: int, page: int, qo_len: int,
                       gpu_workspace: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(batch + heads)
    kv_lens = [int(x) for x in torch.randint(qo_len, max_kv + 1, (batch,), generator=g)]
    kv_lens[0] = max_kv
    case = make_paged_case(kv_lens, heads, page, qo_len=qo_len, causal=qo_len > 1, device=CUDA, seed=heads)
    wrapper = BatchMLAPagedAttentionWrapper(gpu_workspace)
    if fmt == "ds_mla":
        kv, deq = to_fp8_ds_mla(case)
        _plan(wrapper, case, torch.uint8, None)
        out, lse = wrapper.run(case.q_nope, case.q_pe, kv, None, return_lse=True)
    else:
        ckv8, kpe8, deq = to_fp8_per_tensor(case, KV_SCALE)
        _plan(wrapper, case, torch.float8_e4m3fn, None)
        out, lse = wrapper.run(case.q_nope, case.q_pe, ckv8, kpe8, return_lse=True, kv_scale=KV_SCALE)
    assert_attention_close(out, lse, deq.reference(), deq.lowp_reference())
