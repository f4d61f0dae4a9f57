"""Batch-invariant mode: a request's output and LSE are bitwise the same whatever shares its batch.

One paged cache holds a request R and a crowd of others; sub-batches of different size,
composition and order (others short and long enough to change the balanced schedule) are
planned with ``deterministic=True`` and R's rows must match bit for bit, also beside requests of
more query tokens (which change the tile and the row blocks of the launch). Runs under the
interpreter on the CPU (where the property is about the schedule and the merge order) and, in the
``gpu`` variant, with compiled kernels at realistic lengths.
"""

from __future__ import annotations

import pytest
import torch

from openmla import BatchMLAPagedAttentionWrapper
from openmla.testing import PagedCase, assert_attention_close, make_paged_case


def sub_batch(case: PagedCase, order: list[int]) -> tuple[tuple, tuple, list[int]]:
    """Plan and run arguments for the requests ``order`` of ``case`` (same cache), and the query
    rows of each chosen request inside the sub-batch's q."""
    qo, kvp, kvi, kvl = (t.cpu().tolist() for t in (case.qo_indptr, case.kv_indptr, case.kv_indices,
                                                        case.kv_len))
    rows, qo_ptr, kv_ptr, indices, lens = [], [0], [0], [], []
    for b in order:
        rows.append(list(range(qo[b], qo[b + 1])))
        qo_ptr.append(qo_ptr[-1] + qo[b + 1] - qo[b])
        indices += kvi[kvp[b]: kvp[b + 1]]
        kv_ptr.append(len(indices))
        lens.append(kvl[b])
    dev = case.q_nope.device
    flat = [r for rs in rows for r in rs]

    def i32(v: list[int]) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.int32, device=dev)

    plan = (i32(qo_ptr), i32(kv_ptr), i32(indices), i32(lens), case.num_heads, 512, 64, case.page_size,
            case.causal, case.sm_scale, case.q_nope.dtype, case.ckv_cache.dtype)
    run = (case.q_nope[flat].contiguous(), case.q_pe[flat].contiguous(), case.ckv_cache, case.kpe_cache)
    return plan, run, [flat.index(r) for r in rows[order.index(0)]]


def decode_request_zero(case: PagedCase, order: list[int], workspace: torch.Tensor):
    plan, run, rows_of_r = sub_batch(case, order)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*plan, deterministic=True)
    out, lse = wrapper.run(*run, return_lse=True)
    return out[rows_of_r], lse[rows_of_r]


def check_invariance(case: PagedCase, orders: list[list[int]], workspace: torch.Tensor) -> None:
    alone_out, alone_lse = decode_request_zero(case, [0], workspace)
    ref, lowp = case.reference(), case.lowp_reference()
    qo = case.qo_indptr.cpu().tolist()
    r = slice(qo[0], qo[1])
    assert_attention_close(alone_out, alone_lse, (ref[0][r], ref[1][r]), (lowp[0][r], lowp[1][r]))
    for order in orders:
        out, lse = decode_request_zero(case, order, workspace)
        assert torch.equal(out.view(torch.int16), alone_out.view(torch.int16)), f"out differs in batch {order}"
        assert torch.equal(lse.view(torch.int32), alone_lse.view(torch.int32)), f"lse differs in batch {order}"


# Request 0 is long enough to be cut into 3 pieces (in-kernel merge); the others make batches
# whose balanced schedule would cut request 0 differently (one short, one much longer request).
@pytest.mark.parametrize("num_heads, qo_len", [(16, 1), (4, 2)], ids=["H16-Q1", "H4-Q2-causal"])
def test_request_bitwise_identical_across_batches(num_heads: int, qo_len: int, device, workspace) -> None:
    case = make_paged_case([2500, 40, 7000, 0, 300], num_heads, 64, qo_len=[qo_len, qo_len, qo_len, 0, qo_len],
                           causal=qo_len > 1, device=device, seed=3)
    check_invariance(case, [[0, 1], [2, 0, 4], [4, 3, 2, 1, 0], [1, 0, 1, 4]], workspace)


@pytest.mark.parametrize("r_qo_len", [1, 2])
def test_mixed_query_lengths(r_qo_len: int, device, workspace) -> None:
    """Batch mates with more query tokens change the launch (a program takes two 16-row blocks,
    more row blocks), never request 0's arithmetic."""
    case = make_paged_case([2500, 40, 7000, 0, 300], 16, 64, qo_len=[r_qo_len, 2, 3, 0, 1], causal=True,
                           device=device, seed=4)
    check_invariance(case, [[0, 1], [0, 2], [4, 0], [2, 0, 4, 3, 1]], workspace)


def test_request_with_many_pieces_uses_fixed_order(device, workspace) -> None:
    """20 pieces (> the in-kernel merge limit): the merge kernel's order is fixed too."""
    case = make_paged_case([20 * 1024 - 5, 64, 3000], 2, 64, device=device, seed=5)
    check_invariance(case, [[0, 1], [2, 0], [1, 2, 0]], workspace)


@pytest.mark.gpu
@pytest.mark.parametrize("num_heads", [16, 128])
def test_request_bitwise_identical_across_batches_gpu(num_heads: int) -> None:
    lens = [9000, 100, 65000, 4096, 31, 20000, 4096, 4096]
    case = make_paged_case(lens, num_heads, 64, device="cuda", seed=11)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    check_invariance(case, [[0, 1], [2, 0, 3], [7, 6, 5, 4, 3, 2, 1, 0], [0, 5, 5, 5, 5, 5, 5, 5, 5]], ws)


@pytest.mark.gpu
@pytest.mark.parametrize("r_qo_len", [1, 2])
def test_mixed_query_lengths_gpu(r_qo_len: int) -> None:
    """Compiled kernels: one 16-row block per program (request 0 alone with one query token) and
    two per program (beside requests of 2 and 3 tokens) give request 0 the same bits."""
    lens = [9000, 100, 65000, 4096, 31, 20000, 4096, 4096]
    case = make_paged_case(lens, 16, 64, qo_len=[r_qo_len, 2, 3, 1, 2, 1, 2, 3], causal=True, device="cuda",
                           seed=12)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    check_invariance(case, [[0, 1], [2, 0, 3], [7, 6, 5, 4, 3, 2, 1, 0], [0, 5, 5, 5]], ws)
