"""LSE-merge of fp32 split partials into the final output.

Partials of request ``b`` are stored piece after piece: piece ``j`` of the request occupies rows
``req_part_base[b] + j * n_rows + r`` of ``part_o [R, D]`` / ``part_lse [R]`` for the request's
local rows ``r = i * H + h``. One program merges ``BLOCK_H`` heads x ``BLOCK_D`` columns of one
query token, ``BLOCK_S`` pieces per step::

    out = sum_j exp(lse_j - m) o_j / sum_j exp(lse_j - m),   lse = m + log(sum_j exp(lse_j - m))

``req_num_parts[b] == 0`` means the decode wrote the request's output directly (skip). Pieces
with no tokens carry ``lse = -inf`` and weigh nothing; a row with no finite piece gives
``out = 0``, ``lse = -inf``. LSE is natural-log on both sides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _merge_kernel(
    part_o,
    part_lse,
    out,
    lse,
    qo_indptr,
    tok_req,
    req_num_parts,
    req_part_base,
    stride_o_t,
    stride_o_h,
    stride_lse_t,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_hb = tl.program_id(1)
    i_db = tl.program_id(2)
    i_b = tl.load(tok_req + i_t)
    if i_b < 0:
        return
    n_parts = tl.load(req_num_parts + i_b)
    if n_parts == 0:
        return
    q_begin = tl.load(qo_indptr + i_b)
    n_rows = (tl.load(qo_indptr + i_b + 1) - q_begin) * H
    base = tl.load(req_part_base + i_b)

    o_h = i_hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    m_h = o_h < H
    o_d = i_db * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    i_row = (i_t - q_begin) * H + o_h  # [BLOCK_H] request-local rows

    b_m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_H], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_parts, BLOCK_S):
        o_s = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S] pieces merged in one step
        m_sh = (o_s < n_parts)[:, None] & m_h[None, :]  # [BLOCK_S, BLOCK_H]
        i_prow = (base + o_s[:, None] * n_rows + i_row[None, :]).to(tl.int64)  # [BLOCK_S, BLOCK_H]
        b_lse_s = tl.load(part_lse + i_prow, mask=m_sh, other=float("-inf"))
        p_o = part_o + i_prow[:, :, None] * D + o_d[None, None, :]
        b_o_s = tl.load(p_o, mask=m_sh[:, :, None], other=0.0)  # [BLOCK_S, BLOCK_H, BLOCK_D]
        b_m_new = tl.maximum(b_m, tl.max(b_lse_s, 0))
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.math.exp2((b_m - b_m_safe) * LOG2E)
        b_w = tl.math.exp2((b_lse_s - b_m_safe[None, :]) * LOG2E)  # [BLOCK_S, BLOCK_H]
        b_l = b_l * b_alpha + tl.sum(b_w, 0)
        b_acc = b_acc * b_alpha[:, None] + tl.sum(b_w[:, :, None] * b_o_s, 0)  # [BLOCK_H, BLOCK_D]
        b_m = b_m_new

    m_seen = b_l > 0.0
    b_l_safe = tl.where(m_seen, b_l, 1.0)
    b_out = b_acc / b_l_safe[:, None]
    i_t64 = i_t.to(tl.int64)
    p_out = out + i_t64 * stride_o_t + o_h[:, None] * stride_o_h + o_d[None, :]
    tl.store(p_out, b_out.to(out.dtype.element_ty), mask=m_h[:, None])
    if i_db == 0:
        b_lse = tl.where(m_seen, b_m + tl.log(b_l_safe), float("-inf"))
        tl.store(lse + i_t64 * stride_lse_t + o_h, b_lse, mask=m_h)


# Fixed tile (never derived from lengths, so no recompilation): 8 pieces x 4 heads x 128 columns
# per step keeps 16 KB of partials in flight per program, and the (token, head, column) grid
# gives a long split request (W7: ~200 pieces of one token) 16 x 4 programs instead of one.
MERGE_BLOCK_S, MERGE_BLOCK_H, MERGE_BLOCK_D = 8, 4, 128


def launch_merge(
    *,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    qo_indptr: torch.Tensor,
    tok_req: torch.Tensor,
    req_num_parts: torch.Tensor,
    req_part_base: torch.Tensor,
) -> None:
    """Merge partials into ``out [T, H, D]`` / ``lse [T, H]``; ``tok_req`` has one entry per
    program row (``-1`` for padding), so the grid does not depend on the lengths."""
    num_heads, d = out.shape[1], out.shape[2]
    block_d = min(MERGE_BLOCK_D, d)
    grid = (tok_req.numel(), triton.cdiv(num_heads, MERGE_BLOCK_H), d // block_d)
    _merge_kernel[grid](
        part_o,
        part_lse,
        out,
        lse,
        qo_indptr,
        tok_req,
        req_num_parts,
        req_part_base,
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        H=num_heads,
        D=d,
        BLOCK_S=MERGE_BLOCK_S,
        BLOCK_H=MERGE_BLOCK_H,
        BLOCK_D=block_d,
        num_warps=4,
    )
