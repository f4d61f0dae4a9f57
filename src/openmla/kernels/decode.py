"""Split-KV paged MLA decode kernel.

One program handles one *work item* of the plan (a request and a KV token range) for one block
of tile rows (1-D grid: program ``w * ROW_BLOCKS + m``). A request's rows are its (query token,
head) pairs, packed ``row = i * H + h``, so up to ``BLOCK_M`` (64) rows share one pass over its
KV: the ``[BLOCK_N, 576]`` cache tile is loaded once, used as K (scores over 512 + 64 dims) and
its first 512 columns as V. More rows take several row blocks, launched side by side so the
later ones find the KV in L2.

Work item ``w`` (arrays built by ``schedule.py``):
    ``work_req[w]``       request index, ``-1`` for padding (the program exits);
    ``work_kv_begin/end`` token range ``[begin, end)`` inside the request;
    ``work_part_row[w]``  ``-1``: the range is the whole request, write ``out``/``lse`` directly;
                          otherwise the first row of this piece's fp32 partials in ``part_o``;
    ``work_num_parts[w]`` pieces of the request when the decode merges them itself (the last
                          piece to finish, found with an atomic counter per request and row
                          block, merges), 0 when the separate merge kernel does;
    ``work_part_base[w]`` first partial row of the request (piece ``j`` at ``+ j * rows``).

Piece boundaries are multiples of ``BLOCK_N``, so when ``PAGE_SIZE % BLOCK_N == 0`` a block
never straddles pages and one page id addresses the whole ``[BLOCK_N, 576]`` tile
(``ONE_PAGE_PER_BLOCK``); other page sizes gather a page id per token.

Softmax runs in base 2 with ``sm_scale * log2(e)`` folded into the scores; the stored LSE (final
or partial) is natural-log. Rows that see no key get ``out = 0``, ``lse = -inf``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from openmla import _interp
from openmla.config import DecodeConfig
from openmla.kernels.launch import launch

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FIXED_ONE = tl.constexpr(4294967296.0)  # 2**32: the unit of the batch-invariant row sums
PAGE_WINDOW = 64  # page ids held in registers per window (one index load per 4096 tokens at page 64)


# KV cache formats (the KV_FORMAT constexpr; see openmla/fp8.py for the byte layouts)
KV_PLAIN = 0  # ckv / kpe in the query dtype
KV_FP8_TENSOR = 1  # ckv / kpe float8 e4m3, one float32 scale for the cache (``scales[0]``)
KV_FP8_DS_MLA = 2  # DeepSeek V3.2 656-byte rows: fp8 latent, 4 float32 group scales, bf16 rope


@triton.jit
def _load_kv_raw(p_ckv, p_kpe, p_sc, m_n, KV_FORMAT: tl.constexpr):
    """The stored bytes of one block: latent ``[BLOCK_N, 512]``, rope ``[BLOCK_N, 64]`` and, for
    the 656-byte format, the group scales ``[BLOCK_N, 4]`` (else a dummy)."""
    b_ckv = tl.load(p_ckv, mask=m_n[:, None], other=0.0)
    b_kpe = tl.load(p_kpe, mask=m_n[:, None], other=0.0)
    if KV_FORMAT == 2:
        b_sc = tl.load(p_sc, mask=m_n[:, None], other=0.0)
    else:
        b_sc = tl.zeros([1, 1], dtype=tl.float32)
    return b_ckv, b_kpe, b_sc


# Hopper dequantisation in PTX, four fp8 codes (one 32-bit register) per asm block.
#
# Why asm, and why impure: with Triton's own casts the layout pass pushes the two dot-operand
# layouts (K^T for the scores, V for the output) back through the casts onto the fp8 load, and
# Triton 3.6's pipeliner leaves such a load synchronous (16 and 32 tile rows, mma.sync), so the
# latent was loaded every block without any copy in flight. (A TMA descriptor load is pipelined,
# but the casts are then done twice, V's codes read from shared memory a byte at a time.) An
# impure asm block is not recomputed per layout: the fp8 tile's one user is the asm, so the
# pipeliner stages the raw bytes with cp.async (num_stages - 1 blocks ahead), the conversion runs
# once per block, and its 16-bit result reaches both dots through shared memory (ldmatrix /
# ldmatrix.trans).

# e4m3 -> f16 (exact, one cvt per two codes); for bf16 the f16 bits shift into a bf16 with the same
# exponent field (value * 2**-112, normal: codes are 0 or >= 2**-9) and one bf16x2 multiply by
# 2**112 restores the value exactly. (Triton's fp8 -> bf16 cast goes f16 -> bf16 through F2F, the
# conversion unit, 16 results a clock per SM on H100: the per-tensor decode's bottleneck.)
_E4M3X4_TO_BF16 = tl.constexpr("""{
.reg .b16 c0, c1;
.reg .b32 h0, h1, t0, t1, k;
mov.b32 k, 0x77807780;
mov.b32 {c0, c1}, $2;
cvt.rn.f16x2.e4m3x2 h0, c0;
cvt.rn.f16x2.e4m3x2 h1, c1;
shr.b32 t0, h0, 3;
shr.b32 t1, h1, 3;
and.b32 t0, t0, 0x0fff0fff;
and.b32 t1, t1, 0x0fff0fff;
and.b32 h0, h0, 0x80008000;
and.b32 h1, h1, 0x80008000;
or.b32 t0, t0, h0;
or.b32 t1, t1, h1;
mul.rn.bf16x2 $0, t0, k;
mul.rn.bf16x2 $1, t1, k;
}""")

_E4M3X4_TO_F16 = tl.constexpr("""{
.reg .b16 c0, c1;
mov.b32 {c0, c1}, $2;
cvt.rn.f16x2.e4m3x2 $0, c0;
cvt.rn.f16x2.e4m3x2 $1, c1;
}""")

# 656-byte rows: code * group scale in float32, rounded once to bf16 (what dequantize_ds_mla does):
# e4m3 -> f16 (exact), f16 -> f32 (exact; ptxas makes it an HADD2.F32 on the FMA pipe), one
# mul.rn.f32, cvt.rn to bf16 (two values per cvt).
_E4M3X4_SCALED_TO_BF16 = tl.constexpr("""{
.reg .b16 c0, c1, a0, a1, a2, a3;
.reg .b32 h0, h1;
.reg .f32 f0, f1, f2, f3;
mov.b32 {c0, c1}, $2;
cvt.rn.f16x2.e4m3x2 h0, c0;
cvt.rn.f16x2.e4m3x2 h1, c1;
mov.b32 {a0, a1}, h0;
mov.b32 {a2, a3}, h1;
cvt.f32.f16 f0, a0;
cvt.f32.f16 f1, a1;
cvt.f32.f16 f2, a2;
cvt.f32.f16 f3, a3;
mul.rn.f32 f0, f0, $3;
mul.rn.f32 f1, f1, $4;
mul.rn.f32 f2, f2, $5;
mul.rn.f32 f3, f3, $6;
cvt.rn.bf16x2.f32 $0, f1, f0;
cvt.rn.bf16x2.f32 $1, f3, f2;
}""")


@triton.jit
def _e4m3_to_16bit(b, dtype: tl.constexpr):
    """fp8 e4m3 codes to ``dtype`` (bf16 or fp16), exactly, in PTX (sm_90)."""
    if dtype == tl.bfloat16:
        out = tl.inline_asm_elementwise(_E4M3X4_TO_BF16, "=r,=r,r", [b.to(tl.uint8, bitcast=True)],
                                        dtype=tl.bfloat16, is_pure=False, pack=4)
    else:
        out = tl.inline_asm_elementwise(_E4M3X4_TO_F16, "=r,=r,r", [b.to(tl.uint8, bitcast=True)],
                                        dtype=tl.float16, is_pure=False, pack=4)
    return out


@triton.jit
def _dequant_kv(b_ckv, b_kpe, b_sc, q_dtype: tl.constexpr, KV_FORMAT: tl.constexpr,
                BLOCK_N: tl.constexpr, D_CKV: tl.constexpr, DOT_FP32: tl.constexpr,
                ASM_CVT: tl.constexpr):
    """A block's latent and rope tiles in the query dtype (float32 holding the same values in the
    interpreter, ``DOT_FP32``).

    fp8 codes widen exactly. The per-tensor scale is folded into the scores and the output
    instead (no rounding here); the 656-byte format's group scales are applied here in float32
    and the product rounded to bf16, so the kernel computes on exactly the cache that
    ``dequantize_ds_mla`` returns. ``ASM_CVT`` (Hopper): the same values through the PTX above
    (``tests/test_fp8_decode.py`` checks them bitwise); else Triton's casts. NaN codes (0x7F,
    0xFF), which the quantiser never writes, need not come out as NaN."""
    if ASM_CVT:
        if KV_FORMAT == 2:
            b_sc = tl.broadcast_to(b_sc[:, :, None], (BLOCK_N, D_CKV // 128, 128))
            b_ckv = tl.inline_asm_elementwise(
                _E4M3X4_SCALED_TO_BF16, "=r,=r,r,r,r,r,r",
                [b_ckv.to(tl.uint8, bitcast=True), tl.reshape(b_sc, (BLOCK_N, D_CKV))],
                dtype=tl.bfloat16, is_pure=False, pack=4)
        else:
            b_ckv = _e4m3_to_16bit(b_ckv, q_dtype)
            b_kpe = _e4m3_to_16bit(b_kpe, q_dtype)
    else:
        if KV_FORMAT == 2:
            b_ckv = tl.reshape(b_ckv.to(tl.float32), (BLOCK_N, D_CKV // 128, 128)) * b_sc[:, :, None]
            b_ckv = tl.reshape(b_ckv, (BLOCK_N, D_CKV))
            if DOT_FP32:
                # the interpreter's float32 -> bf16 cast truncates; round to nearest even by hand
                bits = b_ckv.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                b_ckv = bits.to(tl.float32, bitcast=True)
        if DOT_FP32:
            b_ckv = b_ckv.to(tl.float32)
            b_kpe = b_kpe.to(tl.float32)
        else:
            b_ckv = b_ckv.to(q_dtype)
            b_kpe = b_kpe.to(q_dtype)
    return b_ckv, b_kpe


@triton.jit
def _attend_block(b_qn, b_qp, b_ckv, b_kpe, o_n, kv_end, b_last, b_m, b_l, b_acc, scale_log2,
                  FIXED_POINT_SUM: tl.constexpr):
    """Online-softmax update with one KV block: tokens ``o_n`` [BLOCK_N], rows [BLOCK_M].
    ``FIXED_POINT_SUM``: the row sum of P (values in [0, 1]) in 2**-32 units, an integer sum whose
    result does not depend on the reduction order the tile's layout gives (the dots' results
    per element and the max do not either); truncation costs < BLOCK_N * 2**-32 against a sum
    >= 1 once a row has seen its max."""
    m_n = o_n < kv_end
    b_s = tl.dot(b_qn, tl.trans(b_ckv))
    b_s = tl.dot(b_qp, tl.trans(b_kpe), b_s) * scale_log2  # [BLOCK_M, BLOCK_N]
    m_visible = m_n[None, :] & (o_n[None, :] <= b_last[:, None])
    b_s = tl.where(m_visible, b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # rows with no key yet
    b_alpha = tl.math.exp2(b_m - b_m_safe)
    b_p = tl.math.exp2(b_s - b_m_safe[:, None])  # [BLOCK_M, BLOCK_N]
    if FIXED_POINT_SUM:
        b_l = b_l * b_alpha + tl.sum((b_p * FIXED_ONE).to(tl.int64), 1).to(tl.float32) * (1.0 / FIXED_ONE)
    else:
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None]
    b_acc = tl.dot(b_p.to(b_ckv.dtype), b_ckv, b_acc)  # [BLOCK_M, D_CKV]
    return b_m_new, b_l, b_acc


@triton.jit
def _mla_decode_kernel(
    q_nope,
    q_pe,
    ckv,
    kpe,
    scales,
    out,
    lse,
    part_o,
    part_lse,
    qo_indptr,
    kv_indptr,
    kv_indices,
    kv_len,
    work_req,
    work_kv_begin,
    work_kv_end,
    work_part_row,
    work_num_parts,
    work_part_base,
    counters,
    scale_log2,
    stride_qn_t,
    stride_qn_h,
    stride_qp_t,
    stride_qp_h,
    stride_ckv_p,
    stride_ckv_t,
    stride_kpe_p,
    stride_kpe_t,
    stride_sc_p,
    stride_sc_t,
    stride_o_t,
    stride_o_h,
    stride_lse_t,
    ROW_BLOCKS,
    H: tl.constexpr,
    D_CKV: tl.constexpr,
    D_KPE: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FIXED_POINT_SUM: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    ONE_PAGE_PER_BLOCK: tl.constexpr,
    PAGE_WINDOW: tl.constexpr,
    DOT_FP32: tl.constexpr,
    KV_FORMAT: tl.constexpr,
    ASM_CVT: tl.constexpr,
):
    # Row blocks of one piece are neighbours in launch order, so they run together and the second
    # one finds the piece's KV in L2 (with the row blocks as the slow grid axis, W2's two row
    # blocks of a piece ran a wave apart and each read the KV from HBM).
    i_w = tl.program_id(0) // ROW_BLOCKS
    i_m = tl.program_id(0) % ROW_BLOCKS
    i_b = tl.load(work_req + i_w)
    if i_b < 0:
        return
    q_begin = tl.load(qo_indptr + i_b)
    qo_len = tl.load(qo_indptr + i_b + 1) - q_begin
    n_rows = qo_len * H
    if i_m * BLOCK_M >= n_rows:
        return
    n_kv = tl.load(kv_len + i_b)
    kv_begin = tl.load(work_kv_begin + i_w)
    kv_end = tl.load(work_kv_end + i_w)
    part_row = tl.load(work_part_row + i_w)
    page_base = tl.load(kv_indptr + i_b)

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] request-local rows
    m_m = o_m < n_rows
    i_tok = o_m // H
    i_head = o_m % H
    o_c = tl.arange(0, D_CKV)
    o_r = tl.arange(0, D_KPE)

    i_qrow = (q_begin + i_tok).to(tl.int64)
    p_qn = q_nope + i_qrow[:, None] * stride_qn_t + i_head[:, None] * stride_qn_h + o_c[None, :]
    p_qp = q_pe + i_qrow[:, None] * stride_qp_t + i_head[:, None] * stride_qp_h + o_r[None, :]
    b_qn = tl.load(p_qn, mask=m_m[:, None], other=0.0)  # [BLOCK_M, D_CKV]
    b_qp = tl.load(p_qp, mask=m_m[:, None], other=0.0)  # [BLOCK_M, D_KPE]
    if DOT_FP32:
        b_qn = b_qn.to(tl.float32)
        b_qp = b_qp.to(tl.float32)
    if KV_FORMAT == 1:
        v_scale = tl.load(scales)  # K = codes * scale: fold into the scores and the output
        scale_log2 = scale_log2 * v_scale
    o_g = tl.arange(0, D_CKV // 128)

    if IS_CAUSAL:
        b_last = n_kv - qo_len + i_tok  # [BLOCK_M] last key each row may see (bottom-right)
    else:
        b_last = tl.zeros([BLOCK_M], dtype=tl.int32) + (n_kv - 1)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, D_CKV], dtype=tl.float32)
    o_blk = tl.arange(0, BLOCK_N)
    if ONE_PAGE_PER_BLOCK:
        # The page ids of PAGE_WINDOW pages are loaded before the inner loop and a block's id is
        # picked from registers: no global load sits between one block's KV copy and the next,
        # which lets Triton's pipeliner keep num_stages - 1 copies in flight without stalling on
        # index latency (an index load inside the loop costs one full memory latency per block).
        o_w = tl.arange(0, PAGE_WINDOW)
        for p_first in range(kv_begin // PAGE_SIZE, tl.cdiv(kv_end, PAGE_SIZE), PAGE_WINDOW):
            w_begin = tl.maximum(p_first * PAGE_SIZE, kv_begin)
            w_end = tl.minimum((p_first + PAGE_WINDOW) * PAGE_SIZE, kv_end)
            m_w = p_first + o_w < tl.cdiv(w_end, PAGE_SIZE)
            b_pages = tl.load(kv_indices + page_base + p_first + o_w, mask=m_w, other=0)  # [PAGE_WINDOW]
            for start in range(w_begin, w_end, BLOCK_N):
                i_page = tl.sum(tl.where(o_w == start // PAGE_SIZE - p_first, b_pages, 0), 0).to(tl.int64)
                o_slot = start % PAGE_SIZE + o_blk  # [BLOCK_N]
                p_ckv = ckv + i_page * stride_ckv_p + o_slot[:, None] * stride_ckv_t + o_c[None, :]
                p_kpe = kpe + i_page * stride_kpe_p + o_slot[:, None] * stride_kpe_t + o_r[None, :]
                p_sc = scales + i_page * stride_sc_p + o_slot[:, None] * stride_sc_t + o_g[None, :]
                o_n = start + o_blk
                b_ckv, b_kpe, b_sc = _load_kv_raw(p_ckv, p_kpe, p_sc, o_n < kv_end, KV_FORMAT)
                b_ckv, b_kpe = _dequant_kv(b_ckv, b_kpe, b_sc, q_nope.dtype.element_ty, KV_FORMAT, BLOCK_N,
                                           D_CKV, DOT_FP32, ASM_CVT)
                b_m, b_l, b_acc = _attend_block(b_qn, b_qp, b_ckv, b_kpe, o_n, kv_end, b_last,
                                                b_m, b_l, b_acc, scale_log2, FIXED_POINT_SUM)
    else:
        for start in range(kv_begin, kv_end, BLOCK_N):
            o_n = start + o_blk  # [BLOCK_N] request-local token ids
            b_page = tl.load(kv_indices + page_base + o_n // PAGE_SIZE, mask=o_n < kv_end, other=0).to(tl.int64)
            b_slot = (o_n % PAGE_SIZE).to(tl.int64)
            p_ckv = ckv + b_page[:, None] * stride_ckv_p + b_slot[:, None] * stride_ckv_t + o_c[None, :]
            p_kpe = kpe + b_page[:, None] * stride_kpe_p + b_slot[:, None] * stride_kpe_t + o_r[None, :]
            p_sc = scales + b_page[:, None] * stride_sc_p + b_slot[:, None] * stride_sc_t + o_g[None, :]
            b_ckv, b_kpe, b_sc = _load_kv_raw(p_ckv, p_kpe, p_sc, o_n < kv_end, KV_FORMAT)
            b_ckv, b_kpe = _dequant_kv(b_ckv, b_kpe, b_sc, q_nope.dtype.element_ty, KV_FORMAT, BLOCK_N,
                                       D_CKV, DOT_FP32, ASM_CVT)
            b_m, b_l, b_acc = _attend_block(b_qn, b_qp, b_ckv, b_kpe, o_n, kv_end, b_last,
                                            b_m, b_l, b_acc, scale_log2, FIXED_POINT_SUM)

    m_seen = b_l > 0.0
    b_l_safe = tl.where(m_seen, b_l, 1.0)
    b_o = b_acc / b_l_safe[:, None]
    if KV_FORMAT == 1:
        b_o = b_o * v_scale
    b_lse = tl.where(m_seen, (b_m + tl.math.log2(b_l_safe)) * LN2, float("-inf"))
    if part_row < 0:
        _store_rows(out, lse, b_o, b_lse, i_qrow, i_head, o_c, m_m, stride_o_t, stride_o_h, stride_lse_t)
    else:
        i_prow = part_row + o_m  # [BLOCK_M] (int32: partial offsets stay below 2**31)
        tl.store(part_o + i_prow[:, None] * D_CKV + o_c[None, :], b_o, mask=m_m[:, None])
        tl.store(part_lse + i_prow, b_lse, mask=m_m)
        n_parts = tl.load(work_num_parts + i_w)  # 0: the merge kernel combines this request
        if n_parts > 0:
            # The last piece of this (request, row block) to finish merges all of them, in piece
            # order (so the result does not depend on which piece came last), and re-arms the
            # counter for the next launch. barrier + acq_rel atomic publish this CTA's stores.
            tl.debug_barrier()
            p_count = counters + i_b * ROW_BLOCKS + i_m
            if tl.atomic_add(p_count, 1, sem="acq_rel", scope="gpu") == n_parts - 1:
                tl.debug_barrier()
                base = tl.load(work_part_base + i_w)
                b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
                b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
                b_acc = tl.zeros([BLOCK_M, D_CKV], dtype=tl.float32)
                # One piece per step: two per step (more loads in flight) measured 1 us faster on
                # W1 but 7 us slower on W5 (H100): the epilogue's registers raise the whole kernel's.
                for j in range(n_parts):
                    b_m, b_l, b_acc = _merge_piece(part_o, part_lse, base + j * n_rows + o_m, m_m, o_c,
                                                   b_m, b_l, b_acc, D_CKV)
                m_seen = b_l > 0.0
                b_l_safe = tl.where(m_seen, b_l, 1.0)
                b_lse = tl.where(m_seen, b_m + tl.log(b_l_safe), float("-inf"))
                _store_rows(out, lse, b_acc / b_l_safe[:, None], b_lse, i_qrow, i_head, o_c, m_m,
                            stride_o_t, stride_o_h, stride_lse_t)
                tl.atomic_xchg(p_count, 0)


@triton.jit
def _merge_piece(part_o, part_lse, i_rows, m_rows, o_c, b_m, b_l, b_acc, D_CKV: tl.constexpr):
    """Fold one piece's fp32 partial rows ``i_rows`` [BLOCK_M] into the running (m, l, acc)."""
    b_lse_j = tl.load(part_lse + i_rows, mask=m_rows, other=float("-inf"), cache_modifier=".cg")
    b_o_j = tl.load(part_o + i_rows[:, None] * D_CKV + o_c[None, :], mask=m_rows[:, None], other=0.0,
                    cache_modifier=".cg")  # [BLOCK_M, D_CKV]
    b_m_new = tl.maximum(b_m, b_lse_j)
    b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_alpha = tl.math.exp2((b_m - b_m_safe) * LOG2E)
    b_w = tl.math.exp2((b_lse_j - b_m_safe) * LOG2E)
    return b_m_new, b_l * b_alpha + b_w, b_acc * b_alpha[:, None] + b_w[:, None] * b_o_j


@triton.jit
def _store_rows(out, lse, b_o, b_lse, i_qrow, i_head, o_c, m_m, stride_o_t, stride_o_h, stride_lse_t):
    """Final output rows (query token i_qrow, head i_head) [BLOCK_M, D_CKV] and their LSE."""
    p_o = out + i_qrow[:, None] * stride_o_t + i_head[:, None] * stride_o_h + o_c[None, :]
    tl.store(p_o, b_o.to(out.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m_m[:, None])
    tl.store(lse + i_qrow * stride_lse_t + i_head, b_lse, mask=m_m)


def launch_decode(
    *,
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    scales: torch.Tensor,
    kv_format: int,
    out: torch.Tensor,
    lse: torch.Tensor,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_len: torch.Tensor,
    work_req: torch.Tensor,
    work_kv_begin: torch.Tensor,
    work_kv_end: torch.Tensor,
    work_part_row: torch.Tensor,
    work_num_parts: torch.Tensor,
    work_part_base: torch.Tensor,
    counters: torch.Tensor,
    sm_scale: float,
    causal: bool,
    row_blocks: int,
    config: DecodeConfig,
) -> None:
    """Run every work item of a plan. Shapes: ``q_nope [T, H, 512]``, ``q_pe [T, H, 64]``,
    caches ``[P, page_size, 512]`` / ``[P, page_size, 64]`` (any page/token strides, unit last
    stride; fp8 views for the fp8 formats, see ``kv_views`` in ops.py), ``scales``: a float32
    ``[P, page_size, 4]`` view of the group scales (656-byte format) or ``[1, 1]`` (per-tensor), ``out [T, H, 512]``, ``lse [T, H]`` fp32, ``part_o [R, 512]`` / ``part_lse [R]`` fp32."""
    num_heads, d_ckv = q_nope.shape[1], q_nope.shape[2]
    grid = (work_req.numel() * row_blocks,)
    dev = q_nope.device
    launch(
        _mla_decode_kernel,
        grid,
        (
            q_nope,
            q_pe,
            ckv_cache,
            kpe_cache,
            scales,
            out,
            lse,
            part_o,
            part_lse,
            qo_indptr,
            kv_indptr,
            kv_indices,
            kv_len,
            work_req,
            work_kv_begin,
            work_kv_end,
            work_part_row,
            work_num_parts,
            work_part_base,
            counters,
            sm_scale * 1.4426950408889634,
            *q_nope.stride()[:2],
            *q_pe.stride()[:2],
            *ckv_cache.stride()[:2],
            *kpe_cache.stride()[:2],
            *scales.stride()[:2],
            *out.stride()[:2],
            lse.stride(0),
            row_blocks,
        ),
        {
            "H": num_heads,
            "D_CKV": d_ckv,
            "D_KPE": q_pe.shape[2],
            "PAGE_SIZE": ckv_cache.shape[1],
            "BLOCK_M": config.block_m,
            "BLOCK_N": config.block_n,
            "FIXED_POINT_SUM": config.fixed_point_sum,
            "IS_CAUSAL": causal,
            "ONE_PAGE_PER_BLOCK": ckv_cache.shape[1] % config.block_n == 0,
            "PAGE_WINDOW": PAGE_WINDOW,
            "DOT_FP32": _interp.dot_in_fp32(dev),
            "KV_FORMAT": kv_format,
            "ASM_CVT": kv_format != KV_PLAIN and _sm90(dev),
            "num_warps": config.num_warps,
            "num_stages": config.num_stages,
        },
    )


def _sm90(device: torch.device) -> bool:
    """A Hopper (or newer) GPU, not the interpreter: the PTX dequantisation (cvt e4m3x2 needs
    sm_89, mul.bf16x2 sm_90)."""
    if device.type != "cuda" or _interp.is_interpreting():
        return False
    return _sm_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.cache
def _sm_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]

