"""What the explicitly warp-specialised ``kv_as_m`` variants (``kv_as_m_fp8``,
``kv_as_m_split_rows``) share: an MMA warpgroup's work on one staged 64-token block, the
arithmetic of ``_kv_as_m_func``'s loop body for ``rows`` of the tile starting at its row
``first``. Their rows' output is ``decode_tilelang.kv_as_m_store_rows``, the default kernel's own."""

from openmla.kernels.decode_tilelang import BLOCK_N, D_CKV


def mma_block(rows: int, first: int, num_heads: int, causal: bool, batched_reduce: bool, dtype: str,
              zero_tail: bool):
    """The block at request-local token ``start``: ``S^T = K Q^T``, the masked online softmax over
    its tokens, ``O^T += V^T P^T``. ``zero_tail``: zero the staged tile's rows past ``kv_end``
    first (a TMA-loaded tile; unused slots may hold NaN, and ``0 * NaN`` would reach the output)."""
    import tilelang.language as T

    BN, acc = BLOCK_N, "float32"
    red_batch = rows // 4 if batched_reduce else 1

    @T.macro
    def block(kv_s, kpe_s, q_s, qp_s, p_s, s_t, o_t, m_i, m_prev, alpha, l_t, start, kv_end, shift, rq0,
              scale_log2):
        T.gemm(kv_s, q_s, s_t, transpose_B=True, clear_accum=True)
        T.gemm(kpe_s, qp_s, s_t, transpose_B=True)
        for j, r in T.Parallel(BN, rows):
            if causal:
                last = T.min(kv_end - 1, shift + (rq0 + first + r) // num_heads)
            else:
                last = kv_end - 1
            s_t[j, r] = T.if_then_else(start + j <= last, s_t[j, r] * scale_log2, -T.infinity(acc))
        T.copy(m_i, m_prev)
        T.reduce_max(s_t, m_i, dim=0, clear=False, batch=red_batch)
        for r in T.Parallel(rows):
            alpha[r] = T.exp2(m_prev[r] - T.if_then_else(m_i[r] == -T.infinity(acc), 0, m_i[r]))
        for j, r in T.Parallel(BN, rows):
            s_t[j, r] = T.exp2(s_t[j, r] - T.if_then_else(m_i[r] == -T.infinity(acc), 0, m_i[r]))
            # the row sums are reduced across threads once, after the loop
            l_t[j, r] = l_t[j, r] * alpha[r] + s_t[j, r]
        T.copy(s_t, p_s)
        if zero_tail and start + BN > kv_end:
            for j, c in T.Parallel(BN, D_CKV):
                if start + j >= kv_end:
                    kv_s[j, c] = T.cast(0, dtype)
        for c, r in T.Parallel(D_CKV, rows):
            o_t[c, r] *= alpha[r]
        T.gemm(kv_s, p_s, o_t, transpose_A=True)

    return block
