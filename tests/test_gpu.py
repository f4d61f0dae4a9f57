"""GPU-only tests: realistic shapes through the compiled Triton kernels (bf16 dots for real, not
the interpreter's fp32 up-cast), the WORKLOADS.md shapes (W1-W7, correctness only), caches of more
than 2**31 elements, and CUDA-graph capture with re-planning. Skipped without CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from openmla import BatchMLAPagedAttentionWrapper, merge_states
from openmla.testing import PagedCase, assert_attention_close, make_paged_case, nan_like, run_and_check

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
D_CKV, D_KPE = 512, 64


def _lengths(batch: int, max_kv: int, seed: int, with_empty: bool) -> list[int]:
    """The first request is max_kv long, the others uniform in [1, max_kv]; one empty request
    in batches of 8 or more when ``with_empty``."""
    g = torch.Generator().manual_seed(seed)
    lens = [max_kv] + torch.randint(1, max_kv + 1, (batch - 1,), generator=g).tolist()
    if with_empty and batch >= 8:
        lens[batch // 2] = 0
    return lens


def _run_and_check(wrapper: BatchMLAPagedAttentionWrapper, case: PagedCase, num_splits: int | None) -> None:
    run_and_check(wrapper, case, num_splits)


# Realistic shapes. Each batch size meets every head count and several page sizes (1, 16, 64 and
# the odd 53); decode (qo_len 1) and causal MTP (qo_len 2) alternate, as do bf16/fp16, the
# automatic schedule and forced split counts, and the packed 576 layout. Page size 1 and B64
# rows keep the total KV modest: the float64 reference runs on the host.
# (batch, heads, max kv_len, page size, qo_len, causal, dtype, num_splits, packed)
REALISTIC = [
    (1, 128, 8192, 64, 1, False, torch.bfloat16, None, False),
    (1, 16, 8192, 16, 2, True, torch.float16, 16, True),
    (1, 4, 8192, 53, 1, False, torch.bfloat16, 4, False),
    (1, 32, 5000, 1, 2, True, torch.bfloat16, None, False),
    (8, 16, 8192, 64, 1, False, torch.float16, None, True),
    (8, 128, 8192, 53, 2, True, torch.bfloat16, None, False),
    (8, 64, 4096, 16, 1, False, torch.bfloat16, 8, False),
    (8, 4, 8192, 64, 2, True, torch.bfloat16, 3, True),
    (8, 32, 2048, 1, 1, False, torch.float16, 2, False),
    (8, 128, 8192, 64, 2, True, torch.float16, 1, False),
    (64, 16, 2048, 64, 1, False, torch.bfloat16, None, False),
    (64, 128, 1024, 16, 2, True, torch.bfloat16, 2, True),
    (64, 4, 2048, 53, 1, False, torch.float16, None, False),
    (64, 64, 1024, 1, 1, False, torch.bfloat16, None, False),
    (64, 32, 2048, 64, 2, True, torch.float16, 5, False),
    (64, 9, 512, 53, 2, True, torch.bfloat16, None, True),
]


def _realistic_id(p: tuple) -> str:
    b, h, kv, page, q, causal, dtype, splits, packed = p
    parts = [f"B{b}", f"H{h}", f"kv{kv}", f"P{page}", f"Q{q}"] + (["causal"] if causal else [])
    parts += ["Sauto" if splits is None else f"S{splits}", "bf16" if dtype == torch.bfloat16 else "fp16"]
    return "-".join(parts + (["packed"] if packed else []))


@pytest.mark.parametrize("params", REALISTIC, ids=_realistic_id)
def test_realistic(params: tuple, gpu_workspace: torch.Tensor) -> None:
    batch, heads, max_kv, page, qo_len, causal, dtype, splits, packed = params
    kv_lens = _lengths(batch, max_kv, seed=batch * heads + page, with_empty=True)
    qo_lens = [min(qo_len, n) if causal else qo_len for n in kv_lens]
    case = make_paged_case(kv_lens, heads, page, qo_len=qo_lens, causal=causal, dtype=dtype, device=CUDA,
                           packed=packed, seed=heads + page)
    _run_and_check(BatchMLAPagedAttentionWrapper(gpu_workspace), case, splits)


# WORKLOADS.md W1-W7 (page 64, sm_scale 1/sqrt(576) as make_paged_case uses), with the batch
# reduced where the host reference would take long; correctness only.
# (id, batch, qo_len, kv_lens, heads)
WORKLOADS = [
    ("W1", 64, 1, [4096] * 64, 16),
    ("W2-B16", 16, 1, [4096] * 16, 128),
    ("W3-B8", 8, 1, [8192] * 8, 128),
    ("W4-B2", 2, 1, [65536] * 2, 16),
    ("W5-B16", 16, 2, [4096] * 16, 16),
    ("W6-B32", 32, 1, [4096] * 32, 4),
    ("W7", 32, 1, [131072] + [1024] * 31, 16),
]


@pytest.mark.parametrize("wid, batch, qo_len, kv_lens, heads", WORKLOADS, ids=[w[0] for w in WORKLOADS])
def test_workload_shapes(wid: str, batch: int, qo_len: int, kv_lens: list[int], heads: int,
                         gpu_workspace: torch.Tensor) -> None:
    case = make_paged_case(kv_lens, heads, 64, qo_len=qo_len, causal=qo_len > 1, device=CUDA, seed=batch)
    wrapper = BatchMLAPagedAttentionWrapper(gpu_workspace)
    _run_and_check(wrapper, case, None)
    if wid == "W7":  # the 128K request must not serialise: the schedule cuts it
        assert wrapper.plan_info["split_requests"] >= 1


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_cache_beyond_2_pow_31_elements(packed: bool) -> None:
    """Pages far beyond element offset 2**31 (ckv alone holds more than 2**31 elements)."""
    page, num_pages = 64, 66_000  # 66000 * 64 * 512 = 2.16e9 > 2**31 (4.3 GB of bf16)
    kv_lens = [3000, 1, 700]
    need = [-(-n // page) for n in kv_lens]
    g = torch.Generator().manual_seed(5)
    # the last pages of the cache, shuffled: every element they hold lies beyond offset 2**31
    used = (num_pages - 1 - torch.randperm(sum(need), generator=g)).tolist()
    if packed:
        storage = torch.empty(num_pages, page, D_CKV + D_KPE, dtype=torch.bfloat16, device=CUDA)
        ckv, kpe = storage[..., :D_CKV], storage[..., D_CKV:]
    else:
        ckv = torch.empty(num_pages, page, D_CKV, dtype=torch.bfloat16, device=CUDA)
        kpe = torch.empty(num_pages, page, D_KPE, dtype=torch.bfloat16, device=CUDA)
    assert ckv.numel() > 2**31 and min(used) * page * D_CKV > 2**31
    small_ckv = torch.randn(len(used), page, D_CKV, generator=g).bfloat16()
    small_kpe = torch.randn(len(used), page, D_KPE, generator=g).bfloat16()
    ckv[used] = small_ckv.to(CUDA)
    kpe[used] = small_kpe.to(CUDA)

    heads = 16
    q = torch.randn(len(kv_lens), heads, D_CKV + D_KPE, generator=g).bfloat16()
    kv_indptr = torch.tensor([0, need[0], need[0] + need[1], sum(need)], dtype=torch.int32)
    qo_indptr = torch.arange(len(kv_lens) + 1, dtype=torch.int32)
    kv_len = torch.tensor(kv_lens, dtype=torch.int32)
    sm_scale = (D_CKV + D_KPE) ** -0.5
    big = PagedCase(q[..., :D_CKV].contiguous().to(CUDA), q[..., D_CKV:].contiguous().to(CUDA), ckv, kpe,
                    qo_indptr.to(CUDA), kv_indptr.to(CUDA), torch.tensor(used, dtype=torch.int32).to(CUDA),
                    kv_len.to(CUDA), page, sm_scale, False)
    # the same batch over a compact host copy of the used pages (page i of it = used[i])
    small = dataclasses.replace(big, q_nope=big.q_nope.cpu(), q_pe=big.q_pe.cpu(), ckv_cache=small_ckv,
                                kpe_cache=small_kpe, kv_indices=torch.arange(len(used), dtype=torch.int32))
    wrapper = BatchMLAPagedAttentionWrapper(torch.empty(64 << 20, dtype=torch.uint8, device=CUDA))
    for num_splits in (None, 1, 4):
        wrapper.plan(*big.plan_args(), num_splits=num_splits)
        out, lse = wrapper.run(*big.run_args(), out=nan_like(big.q_nope), return_lse=True)
        torch.cuda.synchronize()
        assert_attention_close(out, lse, small.reference(), small.lowp_reference())


# CUDA graphs: capture run() once, re-plan with new lengths (same batch size), refill q, replay.
# The cache and page table are sized for the longest lengths any plan uses; a re-plan changes
# kv_len (longer and shorter than before, some requests empty) and the schedule behind it.


def _with_lengths(case: PagedCase, kv_lens: list[int], seed: int) -> PagedCase:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case.q_nope.shape[0], case.num_heads, D_CKV + D_KPE, generator=g).to(case.q_nope.dtype)
    return dataclasses.replace(case, q_nope=q[..., :D_CKV].contiguous().to(CUDA),
                               q_pe=q[..., D_CKV:].contiguous().to(CUDA),
                               kv_len=torch.tensor(kv_lens, dtype=torch.int32, device=CUDA))


@pytest.mark.parametrize("qo_len, causal", [(1, False), (2, True)], ids=["decode", "mtp-causal"])
@pytest.mark.parametrize("num_splits", [None, 4], ids=["Sauto", "S4"])
def test_cuda_graph_replay_after_replan(qo_len: int, causal: bool, num_splits: int | None) -> None:
    batch, heads, page = 8, 16, 16
    max_lens = [6000, 4000, 3000, 2000, 1500, 800, 300, 64]
    base = make_paged_case(max_lens, heads, page, qo_len=qo_len, causal=causal, device=CUDA, seed=9)
    plans = [
        [1000, 4000, 17, 2000, 2, 800, 300, 64],
        [6000, 33, 3000, 5, 1500, 2, 290, 60],  # one long request: the schedule changes shape
    ]
    if not causal:  # causal needs qo_len <= kv_len; empty requests only without it
        plans.append([0, 4000, 0, 0, 1499, 0, 3, 0])
        plans.append([0] * batch)

    # FlashInfer style: caller-owned index buffers with room for every later plan
    bufs = {"qo_indptr": torch.empty(batch + 1, dtype=torch.int32, device=CUDA),
                "kv_indptr": torch.empty(batch + 1, dtype=torch.int32, device=CUDA),
                "kv_indices": torch.empty(base.kv_indices.numel(), dtype=torch.int32, device=CUDA),
                "kv_len_arr": torch.empty(batch, dtype=torch.int32, device=CUDA)}
    wrapper = BatchMLAPagedAttentionWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=CUDA),
                                            use_cuda_graph=True, **bufs)
    first = _with_lengths(base, plans[0], seed=0)
    wrapper.plan(*first.plan_args(), num_splits=num_splits)
    q_nope, q_pe = first.q_nope.clone(), first.q_pe.clone()  # static inputs of the graph
    out = nan_like(q_nope)
    lse = torch.full(q_nope.shape[:2], float("nan"), device=CUDA)

    def step() -> None:
        wrapper.run(q_nope, q_pe, base.ckv_cache, base.kpe_cache, out=out, lse=lse)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert_attention_close(out, lse, first.reference(), first.lowp_reference())

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for i, lens in enumerate(plans[1:] + plans[:1], start=1):
        case = _with_lengths(base, lens, seed=i)
        wrapper.plan(*case.plan_args(), num_splits=num_splits)
        q_nope.copy_(case.q_nope)
        q_pe.copy_(case.q_pe)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_attention_close(out, lse, case.reference(), case.lowp_reference())
        if not any(lens):
            assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_run_does_not_sync_or_allocate(gpu_workspace: torch.Tensor) -> None:
    """run() with out/lse given launches only: no host synchronisation, no allocation."""
    case = make_paged_case([3000, 17, 0, 900], 16, 64, device=CUDA)
    wrapper = BatchMLAPagedAttentionWrapper(gpu_workspace)
    out, lse = nan_like(case.q_nope), torch.empty(case.q_nope.shape[:2], device=CUDA)
    for num_splits in (None, 1, 4):
        wrapper.plan(*case.plan_args(), num_splits=num_splits)
        wrapper.run(*case.run_args(), out=out, lse=lse)  # compile and warm up
        torch.cuda.synchronize()
        allocs = torch.cuda.memory_stats()["allocation.all.allocated"]
        torch.cuda.set_sync_debug_mode("error")
        try:
            wrapper.run(*case.run_args(), out=out, lse=lse)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocs
        torch.cuda.synchronize()
        assert_attention_close(out, lse, case.reference(), case.lowp_reference())


@pytest.mark.parametrize("tokens, heads, parts", [(4, 16, 16), (64, 16, 5), (128, 128, 16)])
def test_merge_states_large(tokens: int, heads: int, parts: int) -> None:
    """merge_states at the reduce micro-benchmark's shapes, against a float64 torch merge."""
    g = torch.Generator().manual_seed(tokens)
    part_out = torch.randn(parts, tokens, heads, D_CKV, generator=g)
    part_lse = torch.randn(parts, tokens, heads, generator=g) * 4
    part_lse[0, :, ::5] = float("-inf")
    part_out[0, :, ::5] = 0.0
    ref_lse = torch.logsumexp(part_lse.double(), 0)
    ref_out = (torch.exp(part_lse.double() - ref_lse)[..., None] * part_out.double()).sum(0)
    out, lse = merge_states(part_out.to(CUDA), part_lse.to(CUDA))
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=torch.finfo(torch.bfloat16).eps, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-6, atol=1e-5)
