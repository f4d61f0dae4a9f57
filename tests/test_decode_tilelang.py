"""The TileLang compute-bound path (64 or 128 heads, pages of 64k tokens, Hopper): against the
float64 oracle on adversarial batches (NaN in unused slots, shuffled pages, empty requests,
lengths that end mid-block), every split mode, MTP causal, both 16-bit dtypes, packed caches,
CUDA-graph replay, the Triton stand-in for strided inputs, and batch invariance, for each kernel
schedule (``SCHEDULES``); DeepSeek V3.2's 656-byte fp8 rows (in-kernel dequantisation, the default
schedule). GPU only; skipped when tilelang is not installed."""

from __future__ import annotations

import pytest
import torch

from openmla import BatchMLAPagedAttentionWrapper
from openmla.kernels.decode_tilelang import SCHEDULES, supports, tilelang_available, uses_kv_as_m
from openmla.testing import (
    assert_attention_close,
    batch_case,
    batch_case_id,
    make_paged_case,
    run_and_check,
    run_and_check_ds_mla,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not tilelang_available(), reason="tilelang is not installed")]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _hopper_only() -> None:
    if not supports(128, 64, "plain", CUDA):
        pytest.skip("the TileLang path needs a Hopper GPU")


@pytest.fixture(autouse=True, params=SCHEDULES)
def _schedule(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs each kernel schedule (``build_kernel`` reads the variable per launch)."""
    monkeypatch.setenv("OPENMLA_TILELANG_SCHEDULE", request.param)
    return request.param


def _check(wrapper: BatchMLAPagedAttentionWrapper, case, num_splits=None, deterministic=False,
           expect: str = "tilelang") -> tuple[torch.Tensor, torch.Tensor]:
    return run_and_check(wrapper, case, num_splits, deterministic, expect_backend=expect)


# (kv_lens, heads, page, qo_len, causal, dtype, num_splits, packed)
CASES = [
    ([4096, 1, 0, 4000, 65, 64, 129], 128, 64, 1, False, torch.bfloat16, None, False),
    ([4096, 1, 0, 4000, 65, 64, 129], 128, 64, 1, False, torch.bfloat16, 3, True),
    ([8192, 300, 2], 128, 64, 2, True, torch.bfloat16, None, False),
    ([8192, 300, 3], 64, 128, 3, True, torch.float16, 20, False),  # merge kernel, > 16 pieces
    ([5000, 70, 1, 0], 64, 64, 1, False, torch.float16, 1, True),
    ([640] * 40, 128, 64, 1, False, torch.bfloat16, None, False),
    ([1000, 2000, 64], 128, 192, 2, True, torch.float16, 2, True),
]


@pytest.mark.parametrize("params", CASES, ids=batch_case_id)
def test_tilelang_against_oracle(params: tuple, gpu_workspace: torch.Tensor) -> None:
    _check(BatchMLAPagedAttentionWrapper(gpu_workspace), batch_case(params, CUDA), params[6])


def test_realistic_w2_w3_shapes(gpu_workspace: torch.Tensor) -> None:
    for batch, kv in ((64, 4096), (16, 8192)):
        case = make_paged_case([kv] * batch, 128, 64, device=CUDA, seed=batch)
        _check(BatchMLAPagedAttentionWrapper(gpu_workspace), case)


@pytest.mark.parametrize("int64_pages", [False, True], ids=["int32", "int64-triton-stand-in"])
def test_strided_query_rows_and_int64_pages(int64_pages: bool, gpu_workspace: torch.Tensor) -> None:
    """Query rows 1024 elements apart; int64 page ids (which the TileLang kernel does not read)
    run the Triton kernel on the same plan."""
    case = make_paged_case([700, 64, 1300], 128, 64, device=CUDA, seed=5)
    case.q_nope = torch.cat([case.q_nope, case.q_nope], dim=-1)[..., :512]
    if int64_pages:
        case.kv_indices = case.kv_indices.to(torch.int64)
    _check(BatchMLAPagedAttentionWrapper(gpu_workspace), case, num_splits=3)


def test_env_pins_triton(gpu_workspace: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENMLA_DECODE_BACKEND", "triton")
    case = make_paged_case([300, 64], 64, 64, device=CUDA, seed=6)
    _check(BatchMLAPagedAttentionWrapper(gpu_workspace), case, expect="triton")


def test_cuda_graph_replay_after_replan(gpu_workspace: torch.Tensor) -> None:
    batch, heads = 4, 128
    first = make_paged_case([4096, 64, 4096, 3000], heads, 64, device=CUDA, seed=7)  # most pages
    num_pages = first.ckv_cache.shape[0]
    bufs = {"qo_indptr": torch.empty(batch + 1, dtype=torch.int32, device=CUDA),
                "kv_indptr": torch.empty(batch + 1, dtype=torch.int32, device=CUDA),
                "kv_indices": torch.empty(4 * num_pages, dtype=torch.int32, device=CUDA),
                "kv_len_arr": torch.empty(batch, dtype=torch.int32, device=CUDA)}
    w = BatchMLAPagedAttentionWrapper(gpu_workspace, use_cuda_graph=True, **bufs)
    w.plan(*first.plan_args())
    assert w.backend == "tilelang"
    q_nope, q_pe = first.q_nope.clone(), first.q_pe.clone()
    out = torch.empty_like(q_nope)
    lse = torch.empty(q_nope.shape[:2], device=CUDA)
    w.run(q_nope, q_pe, first.ckv_cache, first.kpe_cache, out=out, lse=lse)  # compile outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w.run(q_nope, q_pe, first.ckv_cache, first.kpe_cache, out=out, lse=lse)
    for seed, lens in ((8, [64, 4000, 1, 2500]), (9, [3000, 0, 129, 2048])):
        case = make_paged_case(lens, heads, 64, device=CUDA, seed=seed)
        case.ckv_cache, case.kpe_cache = _resized(case, first.ckv_cache, first.kpe_cache)
        w.plan(*case.plan_args())
        q_nope.copy_(case.q_nope)
        q_pe.copy_(case.q_pe)
        graph.replay()
        torch.cuda.synchronize()
        assert_attention_close(out, lse, case.reference(), case.lowp_reference())


def _resized(case, ckv, kpe):
    """Copy the case's pages into the captured caches (same shape or grown in place)."""
    n = case.ckv_cache.shape[0]
    assert n <= ckv.shape[0], "the captured cache must hold the new case's pages"
    ckv[:n].copy_(case.ckv_cache)
    kpe[:n].copy_(case.kpe_cache)
    ckv[n:].fill_(float("nan"))
    kpe[n:].fill_(float("nan"))
    return ckv, kpe


def test_batch_invariant_mode_is_bitwise(gpu_workspace: torch.Tensor) -> None:
    alone = make_paged_case([5000], 128, 64, device=CUDA, seed=11)
    w = BatchMLAPagedAttentionWrapper(gpu_workspace)
    ref_out, ref_lse = _check(w, alone, deterministic=True)
    crowd = make_paged_case([300, 5000, 9000, 64], 128, 64, device=CUDA, seed=12)
    # put the lone request's data in slot 1 of the crowd
    p = alone.kv_indices[: -(-5000 // 64)].long()
    pages = crowd.kv_indices[crowd.kv_indptr[1]: crowd.kv_indptr[1] + p.numel()].long()
    crowd.ckv_cache[pages] = alone.ckv_cache[p]
    crowd.kpe_cache[pages] = alone.kpe_cache[p]
    crowd.q_nope[1] = alone.q_nope[0]
    crowd.q_pe[1] = alone.q_pe[0]
    out, lse = _check(w, crowd, deterministic=True)
    assert torch.equal(out[1], ref_out[0])
    assert torch.equal(lse[1], ref_lse[0])


# (kv_lens, heads, page, qo_len, causal, num_splits): 656-byte fp8 rows; NaN rows in unused slots
# (codes and scales), shuffled pages, empty requests, blocks ending mid-way, MTP causal, the
# in-kernel and the separate merge
DS_MLA_CASES = [
    ([4096, 1, 0, 4000, 65, 64, 129], 128, 64, 1, False, None),
    ([8192, 300, 2], 128, 64, 2, True, None),
    ([8192, 300, 3], 64, 128, 3, True, 20),
    ([5000, 70, 1, 0], 64, 64, 1, False, 1),
    ([1000, 2000, 64], 128, 192, 2, True, 2),
    # fewer than 64 rows a request, padded to the block: only the request's rows are stored
    ([8192, 300, 2, 0, 65], 16, 64, 1, False, None),
    ([4096, 70, 1], 8, 128, 2, True, 3),
    ([3000, 129, 64], 24, 64, 3, True, None),  # 72 rows: a second block with 8 of them
    ([5000, 1], 32, 64, 1, False, 1),  # unsplit: the output rows directly
]


def _ds_mla_id(c: tuple) -> str:
    lens, h, page, q, causal, splits = c
    return "-".join([f"B{len(lens)}", f"H{h}", f"P{page}", f"Q{q}"] + (["causal"] if causal else [])
                    + ["Sauto" if splits is None else f"S{splits}"])


def _check_ds_mla(case, splits, schedule: str, gpu_workspace: torch.Tensor) -> None:
    # the 656-byte rows run in the seesaw schedule; the others leave them to Triton
    run_and_check_ds_mla(BatchMLAPagedAttentionWrapper(gpu_workspace), case, splits,
                         expect_backend="tilelang" if schedule == "seesaw" else "triton")


@pytest.mark.parametrize("params", DS_MLA_CASES, ids=_ds_mla_id)
def test_ds_mla_rows_against_oracle(params: tuple, _schedule: str, gpu_workspace: torch.Tensor) -> None:
    kv_lens, heads, page, qo_len, causal, splits = params
    if _schedule != "seesaw" and params != DS_MLA_CASES[0]:
        pytest.skip("656-byte rows run the seesaw schedule; one case checks the Triton fallback")
    qo = [min(qo_len, n) if causal else qo_len for n in kv_lens]
    case = make_paged_case(kv_lens, heads, page, qo_len=qo, causal=causal, device=CUDA,
                           seed=3 * heads + page + len(kv_lens))
    _check_ds_mla(case, splits, _schedule, gpu_workspace)


def test_ds_mla_head_counts_routed(_schedule: str) -> None:
    """With a 64-row schedule pinned, 656-byte rows take this kernel at head counts that are
    multiples of 8 (padded to 64 rows); odd counts (whose MMAs ptxas serialises) stay on
    Triton, and so do 16-bit caches below 64 heads (the kv_as_m kernel is pinned off)."""
    if _schedule != "seesaw":
        pytest.skip("656-byte rows run the seesaw schedule")
    assert supports(16, 64, "ds_mla", CUDA) and supports(8, 128, "ds_mla", CUDA)
    assert not supports(9, 64, "ds_mla", CUDA) and not supports(1, 64, "ds_mla", CUDA)
    assert supports(64, 64, "plain", CUDA) and not uses_kv_as_m(64, "plain")
    assert not supports(9, 64, "plain", CUDA) and not uses_kv_as_m(16, "ds_mla")


def test_ds_mla_w9_shape(_schedule: str, gpu_workspace: torch.Tensor) -> None:
    if _schedule != "seesaw":
        pytest.skip("656-byte rows run the seesaw schedule")
    case = make_paged_case([8192] * 16, 128, 64, qo_len=2, causal=True, device=CUDA, seed=13)
    _check_ds_mla(case, None, _schedule, gpu_workspace)
