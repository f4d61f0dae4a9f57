"""The TileLang memory-bound kernel for few rows (``kv_as_m`` schedule: ``S^T = K Q^T`` with the
KV tokens as the wgmma M dimension, the request's 1-32 rows as N): against the float64 oracle on
adversarial batches (NaN in unused slots, shuffled pages, empty requests, lengths that end
mid-block), head counts that pad the tile (1, 4, 9, 24), MTP causal, several row blocks, split
counts on both sides of the merge kernel's limit, both 16-bit dtypes, packed caches, the
WORKLOADS shapes, and batch invariance; the same over DeepSeek V3.2's 656-byte fp8 rows
(dequantised in the kernel; NaN codes and scales in unused slots). GPU only; skipped without
tilelang or Hopper."""

from __future__ import annotations

import pytest
import torch

from openmla import BatchMLAPagedAttentionWrapper
from openmla.kernels.decode_tilelang import supports, tilelang_available, wrapper_launches
from openmla.testing import batch_case, batch_case_id, make_paged_case, run_and_check, run_and_check_ds_mla

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not tilelang_available(), reason="tilelang is not installed")]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _kv_as_m(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENMLA_TILELANG_SCHEDULE", "kv_as_m")
    if not supports(16, 64, "plain", CUDA):
        pytest.skip("the TileLang path needs a Hopper GPU")


# (kv_lens, heads, page, qo_len, causal, dtype, num_splits, packed)
CASES = [
    ([4096, 1, 0, 4000, 65, 64, 129], 16, 64, 1, False, torch.bfloat16, None, False),
    ([4096, 1, 0, 4000, 65, 64, 129], 4, 64, 1, False, torch.bfloat16, 3, True),
    ([8192, 300, 2], 16, 128, 2, True, torch.bfloat16, None, False),
    ([8192, 300, 3], 9, 64, 2, True, torch.float16, 20, False),  # merge kernel, > 16 pieces
    ([5000, 70, 1, 0], 1, 64, 1, False, torch.float16, 1, True),
    ([3000, 2000, 64], 24, 192, 2, True, torch.bfloat16, 2, False),  # 48 rows: two row blocks
    ([640] * 40, 8, 64, 1, False, torch.bfloat16, None, False),
]


@pytest.mark.parametrize("params", CASES, ids=batch_case_id)
def test_kv_as_m_against_oracle(params: tuple, gpu_workspace: torch.Tensor) -> None:
    run_and_check(BatchMLAPagedAttentionWrapper(gpu_workspace), batch_case(params, CUDA), params[6],
                  expect_backend="tilelang")


@pytest.mark.parametrize("batch, kv, heads, qo_len", [(64, 4096, 16, 1), (64, 4096, 16, 2), (128, 4096, 4, 1),
                                                      (8, 65536, 16, 1)], ids=["W1", "W5", "W6", "W4"])
def test_kv_as_m_workload_shapes(batch: int, kv: int, heads: int, qo_len: int, gpu_workspace: torch.Tensor) -> None:
    case = make_paged_case([kv] * batch, heads, 64, qo_len=qo_len, causal=qo_len > 1, device=CUDA, seed=batch)
    run_and_check(BatchMLAPagedAttentionWrapper(gpu_workspace), case, expect_backend="tilelang")
    # every kernel so far launched directly, also one loaded from TileLang's disk cache (the
    # GPU script compiles them in other processes first)
    assert wrapper_launches() == 0


def _alone_and_in_a_crowd(kv: int, seed: int):
    """One 16-head request of ``kv`` tokens alone, and the same request (its queries and KV
    pages) as request 1 of a batch beside an MTP request (32-row tiles); returns the two cases
    and the request's query row in the batch."""
    alone = make_paged_case([kv], 16, 64, device=CUDA, seed=seed)
    crowd = make_paged_case([300, kv, 9000], 16, 64, qo_len=[2, 1, 1], device=CUDA, seed=seed + 1)
    p = alone.kv_indices[: -(-kv // 64)].long()
    pages = crowd.kv_indices[crowd.kv_indptr[1]: crowd.kv_indptr[1] + p.numel()].long()
    crowd.ckv_cache[pages] = alone.ckv_cache[p]
    crowd.kpe_cache[pages] = alone.kpe_cache[p]
    row = crowd.qo_indptr[1].item()
    crowd.q_nope[row] = alone.q_nope[0]
    crowd.q_pe[row] = alone.q_pe[0]
    return alone, crowd, row


def test_kv_as_m_batch_invariant(gpu_workspace: torch.Tensor) -> None:
    """A request decoded alone (16 rows: a 16-row tile) and beside an MTP request (32-row tiles)
    in batch-invariant mode: bitwise the same output and lse."""
    alone, crowd, row = _alone_and_in_a_crowd(5000, seed=21)
    ref_out, ref_lse = run_and_check(BatchMLAPagedAttentionWrapper(gpu_workspace), alone, deterministic=True)
    out, lse = run_and_check(BatchMLAPagedAttentionWrapper(gpu_workspace), crowd, deterministic=True)
    assert torch.equal(out[row], ref_out[0]) and torch.equal(lse[row], ref_lse[0])


# (kv_lens, heads, page, qo_len, causal, dtype, num_splits, packed): bf16 queries only
DS_MLA_CASES = [
    ([8192, 300, 2, 0, 65], 16, 64, 1, False, torch.bfloat16, None, False),
    ([4096, 70, 1], 8, 128, 2, True, torch.bfloat16, 3, False),
    ([3000, 129, 64], 24, 64, 2, True, torch.bfloat16, None, False),  # 48 rows: two row blocks
    ([5000, 1, 640], 9, 192, 1, False, torch.bfloat16, 20, False),  # merge kernel, > 16 pieces
    ([640] * 40, 1, 64, 1, False, torch.bfloat16, 1, False),  # unsplit: the output rows directly
    ([8192] * 64, 16, 64, 1, False, torch.bfloat16, None, False),  # W8
]


@pytest.mark.parametrize("params", DS_MLA_CASES, ids=batch_case_id)
def test_kv_as_m_ds_mla_against_oracle(params: tuple, gpu_workspace: torch.Tensor) -> None:
    run_and_check_ds_mla(BatchMLAPagedAttentionWrapper(gpu_workspace), batch_case(params, CUDA), params[6],
                         expect_backend="tilelang")


def test_kv_as_m_ds_mla_batch_invariant(gpu_workspace: torch.Tensor) -> None:
    """656-byte rows in batch-invariant mode: a request alone and beside others (an MTP request
    widens the tile to 32 rows) gives bitwise the same output and lse."""
    alone, crowd, row = _alone_and_in_a_crowd(7000, seed=31)
    ref_out, ref_lse = run_and_check_ds_mla(BatchMLAPagedAttentionWrapper(gpu_workspace), alone,
                                            deterministic=True, expect_backend="tilelang")
    out, lse = run_and_check_ds_mla(BatchMLAPagedAttentionWrapper(gpu_workspace), crowd, deterministic=True,
                                    expect_backend="tilelang")
    assert torch.equal(out[row], ref_out[0]) and torch.equal(lse[row], ref_lse[0])


def _same_bits_either_way(attr: str, params: tuple, check, gpu_workspace: torch.Tensor,
                          monkeypatch: pytest.MonkeyPatch, values: tuple = (False, True)) -> None:
    """The case with the kernel-module default ``attr`` at each of ``values`` (off, then on): each
    against the oracle (``check``), and bitwise the same output and lse."""
    from openmla.kernels import decode_tilelang

    case = batch_case(params, CUDA)
    results = []
    for value in values:
        monkeypatch.setattr(decode_tilelang, attr, value)
        results.append(check(BatchMLAPagedAttentionWrapper(gpu_workspace), case, params[6], expect_backend="tilelang"))
    assert all(torch.equal(r[0], results[0][0]) and torch.equal(r[1], results[0][1]) for r in results[1:])


BATCHED_REDUCE_CASES = [(CASES[0], False), (CASES[2], False), (CASES[5], False), (DS_MLA_CASES[1], True)]


@pytest.mark.parametrize("params, ds_mla", BATCHED_REDUCE_CASES,
                         ids=[("ds_mla-" if d else "") + batch_case_id(p) for p, d in BATCHED_REDUCE_CASES])
def test_kv_as_m_batched_reduce(params: tuple, ds_mla: bool, gpu_workspace: torch.Tensor,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The softmax's batched cross-warp reductions (``KV_AS_M_BATCHED_REDUCE``, on by default)
    and one reduction per column: each against the oracle, and bitwise the same output and lse
    (each column goes through the same butterfly either way)."""
    _same_bits_either_way("KV_AS_M_BATCHED_REDUCE", params, run_and_check_ds_mla if ds_mla else run_and_check,
                          gpu_workspace, monkeypatch)


@pytest.mark.parametrize("params", DS_MLA_CASES[:3], ids=batch_case_id)
def test_kv_as_m_fp8_converter(params: tuple, gpu_workspace: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """656-byte rows with the converting warpgroup (``KV_AS_M_FP8_CONVERTER``, off by default)
    and with the conversion on the MMA warpgroup: each against the oracle, and bitwise the same output
    and lse (the same bf16 tile, the same MMAs in the same order)."""
    _same_bits_either_way("KV_AS_M_FP8_CONVERTER", params, run_and_check_ds_mla, gpu_workspace, monkeypatch)


@pytest.mark.parametrize("params", [DS_MLA_CASES[0], DS_MLA_CASES[3], DS_MLA_CASES[4]], ids=batch_case_id)
def test_kv_as_m_ds_mla_stages(params: tuple, gpu_workspace: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """656-byte rows at 16-row tiles in two and three TMA stages (``KV_AS_M_DS_MLA_STAGES``, three
    by default): each against the oracle, and bitwise the same output and lse (the stage count
    changes when a block lands, not what is computed from it)."""
    _same_bits_either_way("KV_AS_M_DS_MLA_STAGES", params, run_and_check_ds_mla, gpu_workspace, monkeypatch,
                          values=(2, 3))


@pytest.mark.parametrize("params", [CASES[2], CASES[5]], ids=batch_case_id)
def test_kv_as_m_split_rows(params: tuple, gpu_workspace: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """32-row tiles on two MMA warpgroups of 16 rows (``KV_AS_M_SPLIT_ROWS``, off by default) and
    on one: each against the oracle, and bitwise the same output and lse (each row's products and
    softmax are the same operations either way)."""
    _same_bits_either_way("KV_AS_M_SPLIT_ROWS", params, run_and_check, gpu_workspace, monkeypatch)
