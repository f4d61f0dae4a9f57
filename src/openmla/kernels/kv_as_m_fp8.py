"""The ``kv_as_m`` kernel over 656-byte fp8 rows with a converting warpgroup (TileLang, Hopper).

``_kv_as_m_func(ds_mla=True)`` has one consumer warpgroup convert a block's codes to bf16 and then
run both products and the softmax on it, in series: the conversion (~6 instructions per pair of
values) sat on the critical path of every block (W8 ~3 us a block against ~1.2 us of HBM time,
H200). Here the roles are split by hand (TileLang's automatic warp specialisation puts everything
after the loads on one consumer):

- warpgroup 0 (MMA): ``S^T = K Q^T`` [64, rows] and ``O^T += V^T P^T`` [512, rows] on block ``k``'s
  bf16 tile, and the online softmax over its tokens, exactly as ``_kv_as_m_func``;
- warpgroup 1 (converter): loads block ``k + 1``'s codes and group scales from global memory into
  registers (rows past the range read as zeros: unused slots may hold NaN codes or scales) and
  writes ``bf16(code * scale)`` into the other of two bf16 tiles, while warpgroup 0 runs block
  ``k``;
- warpgroup 2 (producer): TMA-loads Q once and each block's rope into one of two rope tiles, and
  prefetches the codes of the block after next into L2, so the converter's loads wait on L2.

Blocks alternate between the two tiles (``k % 2``), walked in pairs; an odd block count gets a
phantom last block (no keys: zero tile, every score masked) so no MMA sits under a condition
(ptxas serialises every MMA of a kernel otherwise). Barriers (mbarriers): ``rope_full[b]`` (TMA
landed), ``conv_full[b]`` (the converter's tile written and fenced for the async proxy),
``empty[b]`` (warpgroup 0's products on tile ``b`` completed). Same arguments and contract as
``_kv_as_m_func(ds_mla=True)``: ``KV`` the e4m3 view of the rows' codes (scales at byte 512 of each
row), ``KPE`` the bf16 view of their last 144 bytes (scales as 8 bf16, then the rope).

Measured slower than the default (W8 kernel 180 us against 166-170, H200, session 15). Session
15 put it down to the block's shared-memory traffic; session 18 measured the default's
dequantisation at 36% of its kernel (160.5 -> 102.6 us compiled out), so why running it beside
the products does not pay is not settled (docs/perf-notes.md). Off by default
(``decode_tilelang.KV_AS_M_FP8_CONVERTER``); kept for A/B runs.
"""

# No `from __future__ import annotations`: TileLang evaluates the kernel's annotations.
from openmla.kernels.decode_tilelang import (
    _DS_MLA_SOURCE,
    BLOCK_N,
    D_CKV,
    D_KPE,
    DQ_STEPS,
    DS_MLA_SCALES_AT,
    DS_MLA_TAIL,
    _no_keys_store,
    _shape_vars,
    _slot_of,
    kv_as_m_store_rows,
)
from openmla.kernels.kv_as_m_ws import mma_block

THREADS = 384  # MMA, converter, producer warpgroups
MMA_REGS, CONVERTER_REGS, PRODUCER_REGS = 240, 240, 24


def kv_as_m_converter_func(num_heads: int, page_size: int, dtype: str, causal: bool, block_m: int,
                           batched_reduce: bool):
    import tilelang.language as T

    H, PAGE, BM, BN = num_heads, page_size, block_m, BLOCK_N
    HALF = D_CKV // 2
    acc = "float32"
    rows, slots, n_idx, batch1, batch, work, part_rows, s_qn, s_qp, s_kv, s_kpe, s_o = _shape_vars()
    no_keys = _no_keys_store(BM, dtype)
    store = kv_as_m_store_rows(BM, 0, batched_reduce, dtype)
    rope_at = DS_MLA_TAIL - D_KPE  # the rope's first bf16 in a KPE row

    STEPS_HALF = DQ_STEPS // 2  # a half block: tokens [0, 32) or [32, 64)

    @T.macro
    def fetch_half(k, h, codes, scl, slot0, tw, KV, kv_begin, kv_end, s_kv):
        """Half ``h`` of block ``k`` (first slot ``slot0``) into registers: in step ``it`` thread
        ``tw`` takes 16 codes of token ``it // 2 * 8 + tw // 16``, channels ``256 (it % 2) + 16 (tw % 16)``
        on (16 threads read 256 contiguous bytes), and their group's scale; rows past the range
        read as zeros."""
        start = kv_begin + k * BN
        for s in T.unroll(STEPS_HALF):
            it = h * STEPS_HALF + s
            row = T.cast(slot0 + it // 2 * 8 + tw // 16, "int64") * s_kv
            ok = start + it // 2 * 8 + tw // 16 < kv_end
            T.call_extern("handle", "om_ldg16", T.address_of(codes[4 * s]), T.access_ptr(KV, "r"),
                          row + it % 2 * HALF + tw % 16 * 16, ok)
            scl[s] = T.call_extern("float32", "om_ldgf", T.access_ptr(KV, "r"),
                                   row + DS_MLA_SCALES_AT + (2 * (it % 2) + tw % 16 // 8) * 4, ok)

    @T.macro
    def store_half(h, codes, scl, cv, tile, tw):
        for s in T.unroll(STEPS_HALF):
            it = h * STEPS_HALF + s
            T.call_extern("handle", "om_dq8", T.address_of(cv[0]), codes[4 * s], codes[4 * s + 1], scl[s])
            T.call_extern("handle", "om_dq8", T.address_of(cv[8]), codes[4 * s + 2], codes[4 * s + 3], scl[s])
            for v in T.vectorized(16):
                tile[it // 2 * 8 + tw // 16, it % 2 * HALF + tw % 16 * 16 + v] = cv[v]

    def convert_block(b: int):
        """The converter's block ``k`` (round ``j`` of tile ``b``), its first half already in
        ``codes_a``: the second half's loads fly while the first is converted, block ``k + 1``'s
        first half's while the second is. ``nslot``: the first slots of blocks ``k`` and ``k + 1``
        (block ``k + 2``'s is looked up here, a block ahead of its use)."""

        @T.macro
        def convert(k, j, tile, empty, conv_full, KV, codes_a, scl_a, codes_b, scl_b, cv, nslot, tw,
                    kv_indices, page_base, kv_begin, kv_end, s_kv):
            start = kv_begin + k * BN
            fetch_half(k, 1, codes_b, scl_b, nslot[0], tw, KV, kv_begin, kv_end, s_kv)
            nslot[0] = nslot[1]
            if start + 2 * BN < kv_end:
                nslot[1] = _slot_of(kv_indices, page_base, start + 2 * BN, PAGE)
            T.barrier_wait(empty[b], (j & 1) ^ 1)
            store_half(0, codes_a, scl_a, cv, tile, tw)
            fetch_half(k + 1, 0, codes_a, scl_a, nslot[0], tw, KV, kv_begin, kv_end, s_kv)
            store_half(1, codes_b, scl_b, cv, tile, tw)
            T.fence_proxy_async()
            T.barrier_arrive(conv_full[b])

        return convert

    def load_rope_block(b: int):
        """The producer's block ``k`` (round ``i`` of tile ``b``): its rope, and the codes of the
        block after next into L2 (64 rows, 42 KB in one page) for the converter."""

        @T.macro
        def load_rope(k, i, tile, rope_full, empty, slot, KPE, KV, kv_indices, page_base, kv_begin, n_blocks,
                      s_kv, tp):
            if k < n_blocks:
                slot[0] = _slot_of(kv_indices, page_base, kv_begin + k * BN, PAGE)
            T.barrier_wait(empty[b], (i & 1) ^ 1)
            if k < n_blocks:
                T.tma_copy(KPE[slot[0]:slot[0] + BN, rope_at:DS_MLA_TAIL], tile, barrier=rope_full[b],
                           annotations={"emit_arrive": 1})
                if k + 2 < n_blocks and tp == 0:
                    T.call_extern("handle", "om_prefetch_l2", T.access_ptr(KV, "r"),
                                  T.cast(_slot_of(kv_indices, page_base, kv_begin + (k + 2) * BN, PAGE), "int64")
                                  * s_kv, BN * s_kv)
            else:
                # the phantom block: nothing to load (its scores are all masked)
                if T.shuffle_elect(128):
                    T.barrier_arrive(rope_full[b])

        return load_rope

    block = mma_block(BM, 0, H, causal, batched_reduce, dtype, zero_tail=False)  # the converter zeroes

    def attend_block(b: int):
        """The MMA warpgroup's block ``k`` (round ``i`` of tile ``b``)."""

        @T.macro
        def attend(k, i, kv_s, kpe_s, q_s, qp_s, p_s, rope_full, conv_full, empty, s_t, o_t, m_i, m_prev,
                   alpha, l_t, kv_begin, kv_end, shift, rq0, scale_log2):
            T.barrier_wait(rope_full[b], i & 1)
            T.barrier_wait(conv_full[b], i & 1)
            block(kv_s, kpe_s, q_s, qp_s, p_s, s_t, o_t, m_i, m_prev, alpha, l_t, kv_begin + k * BN, kv_end, shift,
                  rq0, scale_log2)
            T.barrier_arrive(empty[b])

        return attend

    convert0, convert1 = convert_block(0), convert_block(1)
    load_rope0, load_rope1 = load_rope_block(0), load_rope_block(1)
    attend0, attend1 = attend_block(0), attend_block(1)

    @T.prim_func
    def decode(
        Q: T.StridedTensor([rows, D_CKV], (s_qn, 1), dtype),
        QP: T.StridedTensor([rows, D_KPE], (s_qp, 1), dtype),
        KV: T.StridedTensor([slots, D_CKV], (s_kv, 1), "float8_e4m3fn"),
        KPE: T.StridedTensor([slots, DS_MLA_TAIL], (s_kpe, 1), dtype),
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
            T.import_source(_DS_MLA_SOURCE)
            q_s = T.alloc_shared([BM, D_CKV], dtype)
            qp_s = T.alloc_shared([BM, D_KPE], dtype)
            kv0 = T.alloc_shared([BN, D_CKV], dtype)
            kv1 = T.alloc_shared([BN, D_CKV], dtype)
            kpe0 = T.alloc_shared([BN, D_KPE], dtype)
            kpe1 = T.alloc_shared([BN, D_KPE], dtype)
            p_s = T.alloc_shared([BN, BM], dtype)
            s_t = T.alloc_fragment([BN, BM], acc)
            o_t = T.alloc_fragment([D_CKV, BM], acc)
            m_i = T.alloc_fragment([BM], acc)
            m_prev = T.alloc_fragment([BM], acc)
            alpha = T.alloc_fragment([BM], acc)
            l_t = T.alloc_fragment([BN, BM], acc)  # each thread's part of the row sums
            l_i = T.alloc_fragment([BM], acc)
            lse_f = T.alloc_fragment([BM], acc)
            codes_a = T.alloc_local([2 * DQ_STEPS], "uint32")
            scl_a = T.alloc_local([STEPS_HALF], acc)
            codes_b = T.alloc_local([2 * DQ_STEPS], "uint32")
            scl_b = T.alloc_local([STEPS_HALF], acc)
            cv = T.alloc_local([16], dtype)
            nslot = T.alloc_local([2], "int32")
            slot = T.alloc_local([1], "int32")
            # scalars held in registers: a global re-read after every barrier wait (memory clobber)
            # would sit on the critical path
            sc = T.alloc_local([5], "int32")
            bar_q = T.alloc_barrier([1])
            rope_full = T.alloc_barrier([1, 1])
            conv_full = T.alloc_barrier([128, 128])
            empty = T.alloc_barrier([128, 128])

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
                    T.set_max_nreg(MMA_REGS, 1)
                    T.fill(o_t, 0)
                    T.fill(l_t, 0)
                    T.fill(m_i, -T.infinity(acc))
                    T.barrier_wait(bar_q[0], 0)
                    for i in T.serial(n_pairs):
                        attend0(2 * i, i, kv0, kpe0, q_s, qp_s, p_s, rope_full, conv_full, empty,
                               s_t, o_t, m_i, m_prev, alpha, l_t, kv_begin, kv_end, shift, rq0, scale_log2)
                        attend1(2 * i + 1, i, kv1, kpe1, q_s, qp_s, p_s, rope_full, conv_full, empty,
                               s_t, o_t, m_i, m_prev, alpha, l_t, kv_begin, kv_end, shift, rq0, scale_log2)
                    store(l_t, l_i, o_t, m_i, lse_f, Out, Lse, PartO, PartLse, row0, rq0, part_row, valid)
                elif tx < 256:
                    T.set_max_nreg(CONVERTER_REGS, 1)
                    nslot[0] = _slot_of(kv_indices, page_base, kv_begin, PAGE)
                    nslot[1] = nslot[0]
                    if kv_begin + BN < kv_end:
                        nslot[1] = _slot_of(kv_indices, page_base, kv_begin + BN, PAGE)
                    fetch_half(0, 0, codes_a, scl_a, nslot[0], tx - 128, KV, kv_begin, kv_end, s_kv)
                    for i in T.serial(n_pairs):
                        convert0(2 * i, i, kv0, empty, conv_full, KV, codes_a, scl_a, codes_b, scl_b, cv, nslot,
                                 tx - 128, kv_indices, page_base, kv_begin, kv_end, s_kv)
                        convert1(2 * i + 1, i, kv1, empty, conv_full, KV, codes_a, scl_a, codes_b, scl_b, cv,
                                 nslot, tx - 128, kv_indices, page_base, kv_begin, kv_end, s_kv)
                else:
                    T.set_max_nreg(PRODUCER_REGS, 0)
                    T.tma_copy(Q[row0:row0 + BM, :], q_s, barrier=bar_q[0])
                    T.tma_copy(QP[row0:row0 + BM, :], qp_s, barrier=bar_q[0], annotations={"emit_arrive": 1})
                    for i in T.serial(n_pairs):
                        load_rope0(2 * i, i, kpe0, rope_full, empty, slot, KPE, KV, kv_indices, page_base,
                                  kv_begin, n_blocks, s_kv, tx - 256)
                        load_rope1(2 * i + 1, i, kpe1, rope_full, empty, slot, KPE, KV, kv_indices,
                                  page_base, kv_begin, n_blocks, s_kv, tx - 256)
            elif i_b >= 0 and i_m * BM < qo_len * H:
                no_keys(Out, Lse, PartO, PartLse, q_begin * H + i_m * BM, i_m * BM, work_part_row[i_w],
                        qo_len * H - i_m * BM)

    return decode
