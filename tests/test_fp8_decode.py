"""Decode over fp8 KV caches: DeepSeek V3.2's 656-byte rows (``kv_data_type=torch.uint8``) and
per-tensor float8 e4m3 (``kv_data_type=torch.float8_e4m3fn`` with ``run(..., kv_scale=)``).

The oracle runs on the dequantised cache (plain torch, ``openmla.reference``): the same error
budget as the 16-bit decode applies. Against the unquantised cache the error is the
quantisation error, checked against the bound documented in DESIGN.md ("FP8 decode")."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from openmla import BatchMLAPagedAttentionWrapper
from openmla.testing import (
    assert_attention_close,
    make_paged_case,
    nan_like,
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


def _quant_bound(case) -> float:
    """DESIGN.md "FP8 decode": |out(fp8 cache) - out(16-bit cache)| <= 2**-3 * max|ckv| for these
    randn caches (e4m3 rounds each value to 2**-4 relative; scores move with K's error)."""
    used = torch.nan_to_num(case.ckv_cache.float(), nan=0.0)
    return 2.0**-3 * float(used.abs().max())


@pytest.mark.parametrize("c", CASES, ids=_id)
def test_ds_mla_decode(c: tuple, device: torch.device, workspace: torch.Tensor) -> None:
    case, splits = _case(c, device)
    kv, deq = to_fp8_ds_mla(case)
    kv_before = kv.clone()
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    _plan(wrapper, case, torch.uint8, splits)
    out, lse = nan_like(case.q_nope), torch.full(case.q_nope.shape[:2], float("nan"), device=device)
    wrapper.run(case.q_nope, case.q_pe, kv, None, out=out, lse=lse)
    assert_attention_close(out, lse, deq.reference(), deq.lowp_reference())
    assert torch.equal(kv, kv_before)
    ref = case.reference()[0]
    assert float((out.double() - ref.double()).abs().max()) <= _quant_bound(case)


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
