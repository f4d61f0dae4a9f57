"""LSE-merge of fp32 split partials into the final output.

Query token ``t`` with ``n = tok_num_parts[t]`` pieces has the partials of piece ``j``, head
``h`` in row ``tok_part_row[t] + j * tok_part_stride[t] + h`` of ``part_o [R, D]`` /
``part_lse [R]``. One program merges one (token, head) row for ``BLOCK_D`` columns, ``BLOCK_S``
pieces per step::

    out = sum_j exp(lse_j - m) o_j / sum_j exp(lse_j - m),   lse = m + log(sum_j exp(lse_j - m))

``tok_num_parts[t] == 0`` means the decode wrote token ``t`` directly (skip). Pieces with no
tokens carry ``lse = -inf`` and weigh nothing; a row with no finite piece gives ``out = 0``,
``lse = -inf``. LSE is natural-log on both sides.
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
    tok_part_row,
    tok_num_parts,
    tok_part_stride,
    stride_o_t,
    stride_o_h,
    stride_lse_t,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    i_db = tl.program_id(2)
    n_parts = tl.load(tok_num_parts + i_t)
    if n_parts == 0:
        return
    row0 = tl.load(tok_part_row + i_t) + i_h
    stride = tl.load(tok_part_stride + i_t)
    o_d = i_db * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    o_s = tl.arange(0, BLOCK_S)

    b_m = tl.full([1], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([1], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_parts, BLOCK_S):
        m_s = s0 + o_s < n_parts  # [BLOCK_S]
        i_prow = row0 + (s0 + o_s) * stride  # [BLOCK_S] (int32: the workspace holds < 2**31 floats)
        b_lse_s = tl.load(part_lse + i_prow, mask=m_s, other=float("-inf"))
        b_o_s = tl.load(part_o + i_prow[:, None] * D + o_d[None, :], mask=m_s[:, None], other=0.0)  # [BLOCK_S, BLOCK_D]
        b_m_new = tl.maximum(b_m, tl.max(b_lse_s, 0))
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.math.exp2((b_m - b_m_safe) * LOG2E)
        b_w = tl.math.exp2((b_lse_s - b_m_safe) * LOG2E)  # [BLOCK_S]
        b_l = b_l * b_alpha + tl.sum(b_w, 0)
        b_acc = b_acc * b_alpha + tl.sum(b_w[:, None] * b_o_s, 0)  # [BLOCK_D]
        b_m = b_m_new

    m_seen = b_l > 0.0
    b_l_safe = tl.where(m_seen, b_l, 1.0)
    b_out = b_acc / b_l_safe
    p_out = out + i_t.to(tl.int64) * stride_o_t + i_h * stride_o_h + o_d
    tl.store(p_out, b_out.to(out.dtype.element_ty, fp_downcast_rounding="rtne"))
    if i_db == 0:
        b_lse = tl.where(m_seen, b_m + tl.log(b_l_safe), float("-inf"))
        tl.store(lse + i_t.to(tl.int64) * stride_lse_t + i_h + tl.arange(0, 1), b_lse)


# Fixed tile (never derived from lengths, so no recompilation). One (token, head) row per program
# keeps registers low (many programs per SM) and the dependent-load chain short; 16 pieces x 128
# columns per step lets a long request's ~200 pieces (W7) merge in 13 steps on 4 programs a head.
MERGE_BLOCK_S, MERGE_BLOCK_D = 16, 128


def launch_merge(
    *,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    tok_part_row: torch.Tensor,
    tok_num_parts: torch.Tensor,
    tok_part_stride: torch.Tensor,
) -> None:
    """Merge partials into ``out [T, H, D]`` / ``lse [T, H]`` (unit last strides); the token
    arrays have one entry per grid row, padding rows with ``tok_num_parts = 0``."""
    num_heads, d = out.shape[1], out.shape[2]
    block_d = min(MERGE_BLOCK_D, d)
    grid = (tok_num_parts.numel(), num_heads, d // block_d)
    _merge_kernel[grid](
        part_o,
        part_lse,
        out,
        lse,
        tok_part_row,
        tok_num_parts,
        tok_part_stride,
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        D=d,
        BLOCK_S=MERGE_BLOCK_S,
        BLOCK_D=block_d,
        num_warps=4,
    )
