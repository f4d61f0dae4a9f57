"""The ``kv_as_m`` kernel for 32-row tiles with two MMA warpgroups (TileLang, Hopper).

``_kv_as_m_func`` runs a 32-row tile (MTP at 16 heads, 17-32 heads) on one consumer warpgroup: per
64-token block ``S^T = K Q^T`` (m64n32), the softmax over the tokens, then ``O^T += V^T P^T``,
in series, ~2.7 us a block against ~2.0 us of HBM time (W5, H200). Here warpgroup ``w`` (0, 1)
owns rows ``[16 w, 16 w + 16)``: both run the same block's products and softmax on their own
rows (m64n16), at the same time, from one staged KV tile (each KV byte still read from HBM once).
Warpgroup 2 TMA-loads Q once and the blocks into two stages (``k % 2``), walked in pairs; an odd
block count gets a phantom last block (every score masked, its V rows zeroed) so no MMA sits under
a condition. Barriers: ``full[b]`` (TMA landed), ``empty[b]`` (both MMA warpgroups' products on
stage ``b`` completed).

TileLang's cross-warp reductions synchronise on named barriers 1 and 2 whatever the threads
(``tl::AllReduce`` with ``tl::NamedBarrier``); two warpgroups reducing at once would meet on
them. Warpgroup 1's reductions (the ones at thread offset 128) are rewritten in the generated CUDA
to barriers 5 and 6 (:func:`separate_reduce_barriers`).

Measured slower than one warpgroup (W5 kernel 91.2 us against 83.0, H200, session 15;
docs/perf-notes.md). Off by default (``decode_tilelang.KV_AS_M_SPLIT_ROWS``); kept for A/B runs.
"""

# No `from __future__ import annotations`: TileLang evaluates the kernel's annotations.
import re

from openmla.kernels.decode_tilelang import (
    BLOCK_N,
    D_CKV,
    D_KPE,
    _no_keys_store,
    _shape_vars,
    _slot_of,
    kv_as_m_store_rows,
)
from openmla.kernels.kv_as_m_ws import mma_block

THREADS = 384  # two MMA warpgroups, one producer
MMA_REGS, PRODUCER_REGS = 240, 24
HALF_ROWS = 16  # a warpgroup's rows
MARKER = "openmla_split_rows_kernel"
_SOURCE = r"""
// openmla_split_rows_kernel: warpgroup 1's cross-warp reductions on named barriers 5 and 6
namespace om {
template <int all_threads> struct NamedBarrier56 {
  template <int phase = 1> static __device__ __forceinline__ void sync() {
    asm volatile("bar.sync %0, %1;" : : "r"(phase + 4), "r"(all_threads));
  }
};
}  // namespace om
"""
# a reduction template instance at thread offset 128 (warpgroup 1): AllReduce<Op, threads, scale, 128, Barrier...
_WG1_REDUCE = re.compile(r"(tl::AllReduce<tl::\w+Op, \d+, \d+, 128, )tl::NamedBarrier<128>")


def separate_reduce_barriers(code: str, target=None) -> str:
    """TileLang's CUDA post-processing hook: in this module's kernels only, warpgroup 1's
    cross-warp reductions synchronise on barriers 5 and 6 instead of 1 and 2."""
    if MARKER not in code:
        return code
    return _WG1_REDUCE.sub(r"\1om::NamedBarrier56<128>", code)


def split_rows_func(num_heads: int, page_size: int, dtype: str, causal: bool, batched_reduce: bool):
    import tilelang.language as T

    H, PAGE, BN, HR = num_heads, page_size, BLOCK_N, HALF_ROWS
    BM = 2 * HR
    acc = "float32"
    rows, slots, n_idx, batch1, batch, work, part_rows, s_qn, s_qp, s_kv, s_kpe, s_o = _shape_vars()
    no_keys = _no_keys_store(BM, dtype)

    def load_block(b: int):
        """The producer's block ``k`` (round ``i`` of stage ``b``)."""

        @T.macro
        def load(k, i, kv_s, kpe_s, full, empty, slot, KV, KPE, kv_indices, page_base, kv_begin, n_blocks):
            if k < n_blocks:
                slot[0] = _slot_of(kv_indices, page_base, kv_begin + k * BN, PAGE)
            T.barrier_wait(empty[b], (i & 1) ^ 1)
            if k < n_blocks:
                T.tma_copy(KV[slot[0]:slot[0] + BN, :], kv_s, barrier=full[b])
                T.tma_copy(KPE[slot[0]:slot[0] + BN, :], kpe_s, barrier=full[b], annotations={"emit_arrive": 1})
            else:
                # the phantom block: nothing to load
                if T.shuffle_elect(128):
                    T.barrier_arrive(full[b])

        return load

    def attend_block(b: int, w: int):
        """Warpgroup ``w``'s rows of block ``k`` (round ``i`` of stage ``b``)."""
        block = mma_block(HR, w * HR, H, causal, batched_reduce, dtype, zero_tail=True)

        @T.macro
        def attend(k, i, kv_s, kpe_s, q_s, qp_s, p_s, full, empty, s_t, o_t, m_i, m_prev, alpha, l_t, kv_begin,
                   kv_end, shift, rq0, scale_log2):
            T.barrier_wait(full[b], i & 1)
            # both warpgroups zero the tile's rows past the range (the same zeros) before their P V
            block(kv_s, kpe_s, q_s, qp_s, p_s, s_t, o_t, m_i, m_prev, alpha, l_t, kv_begin + k * BN, kv_end, shift,
                  rq0, scale_log2)
            T.barrier_arrive(empty[b])

        return attend

    def rows_of(w: int):
        """Warpgroup ``w``'s whole piece: the blocks in pairs, then its rows' output."""
        att0, att1 = attend_block(0, w), attend_block(1, w)
        store = kv_as_m_store_rows(HR, w * HR, batched_reduce, dtype)

        @T.macro
        def run(kv0, kpe0, kv1, kpe1, q_s, qp_s, p_s, full, empty, bar_q, s_t, o_t, m_i, m_prev, alpha, l_t, l_i,
                lse_f, Out, Lse, PartO, PartLse, kv_begin, kv_end, shift, rq0, row0, part_row, valid, n_pairs,
                scale_log2):
            T.set_max_nreg(MMA_REGS, 1)
            T.fill(o_t, 0)
            T.fill(l_t, 0)
            T.fill(m_i, -T.infinity(acc))
            T.barrier_wait(bar_q[0], 0)
            for i in T.serial(n_pairs):
                att0(2 * i, i, kv0, kpe0, q_s, qp_s, p_s, full, empty, s_t, o_t, m_i, m_prev, alpha, l_t,
                     kv_begin, kv_end, shift, rq0, scale_log2)
                att1(2 * i + 1, i, kv1, kpe1, q_s, qp_s, p_s, full, empty, s_t, o_t, m_i, m_prev, alpha, l_t,
                     kv_begin, kv_end, shift, rq0, scale_log2)
            store(l_t, l_i, o_t, m_i, lse_f, Out, Lse, PartO, PartLse, row0, rq0, part_row, valid)

        return run

    run0, run1 = rows_of(0), rows_of(1)
    load0, load1 = load_block(0), load_block(1)

    @T.prim_func
    def decode(
        Q: T.StridedTensor([rows, D_CKV], (s_qn, 1), dtype),
        QP: T.StridedTensor([rows, D_KPE], (s_qp, 1), dtype),
        KV: T.StridedTensor([slots, D_CKV], (s_kv, 1), dtype),
        KPE: T.StridedTensor([slots, D_KPE], (s_kpe, 1), dtype),
        kv_indices: T.Tensor([n_idx], "int32"),
        qo_indptr: T.Tensor([batch1], "int32"),
        kv_indptr: T.Tensor([batch1], "int32"),
        kv_len: T.Tensor([batch], "int32"),
        work_req: T.Tensor([work], "int32"),
        work_kv_begin: T.Tensor([work], "int32"),
        work_kv_end: T.Tensor([work], "int32"),
        work_part_row: T.Tensor([work], "int32"),
        Out: T.StridedTensor([rows, D_CKV], (s_o, 1), dtype),
        Lse: T.Tensor([rows], acc),
        PartO: T.Tensor([part_rows, D_CKV], acc),
        PartLse: T.Tensor([part_rows], acc),
        scale_log2: T.float32,
        row_blocks: T.int32,
    ):
        with T.Kernel(row_blocks, work, threads=THREADS) as (i_m, i_w):
            T.import_source(_SOURCE)
            q0 = T.alloc_shared([HR, D_CKV], dtype)
            qp0 = T.alloc_shared([HR, D_KPE], dtype)
            q1 = T.alloc_shared([HR, D_CKV], dtype)
            qp1 = T.alloc_shared([HR, D_KPE], dtype)
            kv0 = T.alloc_shared([BN, D_CKV], dtype)
            kpe0 = T.alloc_shared([BN, D_KPE], dtype)
            kv1 = T.alloc_shared([BN, D_CKV], dtype)
            kpe1 = T.alloc_shared([BN, D_KPE], dtype)
            p0 = T.alloc_shared([BN, HR], dtype)
            p1 = T.alloc_shared([BN, HR], dtype)
            s_t0 = T.alloc_fragment([BN, HR], acc)
            o_t0 = T.alloc_fragment([D_CKV, HR], acc)
            m_i0 = T.alloc_fragment([HR], acc)
            m_prev0 = T.alloc_fragment([HR], acc)
            alpha0 = T.alloc_fragment([HR], acc)
            l_t0 = T.alloc_fragment([BN, HR], acc)
            l_i0 = T.alloc_fragment([HR], acc)
            lse0 = T.alloc_fragment([HR], acc)
            s_t1 = T.alloc_fragment([BN, HR], acc)
            o_t1 = T.alloc_fragment([D_CKV, HR], acc)
            m_i1 = T.alloc_fragment([HR], acc)
            m_prev1 = T.alloc_fragment([HR], acc)
            alpha1 = T.alloc_fragment([HR], acc)
            l_t1 = T.alloc_fragment([BN, HR], acc)
            l_i1 = T.alloc_fragment([HR], acc)
            lse1 = T.alloc_fragment([HR], acc)
            slot = T.alloc_local([1], "int32")
            # scalars held in registers: a global re-read after every barrier wait (memory clobber)
            # would sit on the critical path
            sc = T.alloc_local([5], "int32")
            bar_q = T.alloc_barrier([1])
            full = T.alloc_barrier([1, 1])
            empty = T.alloc_barrier([256, 256])

            tx = T.get_thread_binding()
            i_b = work_req[i_w]
            q_begin = qo_indptr[T.max(i_b, 0)]
            qo_len = qo_indptr[T.max(i_b, 0) + 1] - q_begin
            if i_b >= 0 and i_m * BM < qo_len * H and work_kv_begin[i_w] < work_kv_end[i_w]:
                sc[0] = work_kv_begin[i_w]
                sc[1] = work_kv_end[i_w]
                sc[2] = kv_indptr[i_b]
                sc[3] = work_part_row[i_w]
                sc[4] = kv_len[i_b] - qo_len  # causal: row r sees keys up to shift + its token
                kv_begin = sc[0]
                kv_end = sc[1]
                page_base = sc[2]
                part_row = sc[3]
                shift = sc[4]
                row0 = q_begin * H + i_m * BM
                rq0 = i_m * BM  # request-local row of the block's first row
                valid = qo_len * H - rq0
                n_blocks = T.ceildiv(kv_end - kv_begin, BN)
                n_pairs = T.ceildiv(n_blocks, 2)

                if tx < 128:
                    run0(kv0, kpe0, kv1, kpe1, q0, qp0, p0, full, empty, bar_q, s_t0, o_t0, m_i0, m_prev0, alpha0,
                         l_t0, l_i0, lse0, Out, Lse, PartO, PartLse, kv_begin, kv_end, shift, rq0, row0, part_row,
                         valid, n_pairs, scale_log2)
                elif tx < 256:
                    run1(kv0, kpe0, kv1, kpe1, q1, qp1, p1, full, empty, bar_q, s_t1, o_t1, m_i1, m_prev1, alpha1,
                         l_t1, l_i1, lse1, Out, Lse, PartO, PartLse, kv_begin, kv_end, shift, rq0, row0, part_row,
                         valid, n_pairs, scale_log2)
                else:
                    T.set_max_nreg(PRODUCER_REGS, 0)
                    T.tma_copy(Q[row0:row0 + HR, :], q0, barrier=bar_q[0])
                    T.tma_copy(Q[row0 + HR:row0 + BM, :], q1, barrier=bar_q[0])
                    T.tma_copy(QP[row0:row0 + HR, :], qp0, barrier=bar_q[0])
                    T.tma_copy(QP[row0 + HR:row0 + BM, :], qp1, barrier=bar_q[0], annotations={"emit_arrive": 1})
                    for i in T.serial(n_pairs):
                        load0(2 * i, i, kv0, kpe0, full, empty, slot, KV, KPE, kv_indices, page_base, kv_begin,
                              n_blocks)
                        load1(2 * i + 1, i, kv1, kpe1, full, empty, slot, KV, KPE, kv_indices, page_base, kv_begin,
                              n_blocks)
            elif i_b >= 0 and i_m * BM < qo_len * H:
                no_keys(Out, Lse, PartO, PartLse, q_begin * H + i_m * BM, i_m * BM, work_part_row[i_w],
                        qo_len * H - i_m * BM)

    return decode
