"""Decode in TileLang (Hopper warpgroup MMA, TMA, warp specialisation), the optional fast path:
a compute-bound kernel for tiles of 64 query rows (``num_heads % 64 == 0``: 64 or 128 heads, any
``qo_len``; 656-byte fp8 rows at ``num_heads % 8 == 0``) and a memory-bound one below 64 heads
(``_kv_as_m_func``: the KV tokens as the MMAs' M dimension; 16-bit caches and 656-byte rows).

One program handles one work item of the plan (see ``openmla.schedule``) for one 64-row block:
the plan's arrays are read exactly as the Triton kernel reads them, so both paths share the
schedule, the workspace and the merge kernel. A row block is 64 consecutive rows of the
flattened ``[T * H, 512]`` queries (token-major, then head), so with ``H % 64 == 0`` it never
straddles two requests; below that (fp8 rows), the rows past the request's are computed and not
stored.

Layout of a program (256 threads, two warpgroups): ``S = Q K^T`` is split by columns between the
warpgroups and exchanged through shared memory, the ``[64, 512]`` fp32 output accumulator is
split by columns (256 each), so neither warpgroup spills. The ``[64, 576]`` K tile is staged
once and reused as V. KV blocks are 64 tokens inside one page (``page_size % 64 == 0``), so a
block is one contiguous slice of the cache; the last, partial block is copied row by row with
rows past the range zeroed (unused slots may hold NaN, and ``0 * NaN`` would reach the output).

Compiled once per (heads, page size, dtype, causal): batch size, pages, work items and partial
rows are dynamic. Imported lazily: tilelang is an optional dependency.
"""

# No `from __future__ import annotations`: TileLang evaluates the kernel's annotations, which
# name local shape variables.
import functools
import os

import torch

from openmla.config import DecodeConfig

D_CKV = 512
D_KPE = 64
BLOCK_M = 64
BLOCK_N = 64
THREADS = 256
NUM_STAGES = 2
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# What plan() schedules with (row blocks of 64, pieces cut at multiples of 64); the warp and
# stage fields also serve the Triton kernel when it stands in (strided queries, int64 page ids).
PLAN_CONFIG = DecodeConfig(block_m=BLOCK_M, block_n=BLOCK_N, num_warps=8, num_stages=2)


@functools.cache
def tilelang_available() -> bool:
    try:
        import tilelang  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken tilelang install must not break the Triton path
        return False
    return True


CACHE_LAYOUTS = ("plain", "ds_mla")  # 16-bit ckv / kpe caches; 656-byte fp8 rows (bf16 queries)


def supports(num_heads: int, page_size: int, layout: str | None, device: torch.device) -> bool:
    """Whether the TileLang path can run this plan (the Triton kernel covers everything else).
    ``layout``: one of ``CACHE_LAYOUTS`` (None: a cache this path does not read). Below 64 heads
    both run the ``kv_as_m`` kernel (:func:`uses_kv_as_m`); the compute-bound schedules take
    16-bit caches at multiples of 64 heads and 656-byte rows at multiples of 8 (``seesaw``
    only)."""
    if layout not in CACHE_LAYOUTS or not (device.type == "cuda" and page_size % BLOCK_N == 0):
        return False
    if not (_is_hopper(device) and tilelang_available()):
        return False
    if uses_kv_as_m(num_heads, layout):
        return True
    if layout == "ds_mla" and _schedule_name() != "seesaw":
        return False
    # fp8 rows pad a head count to the 64-row block: the Triton kernel's dequantisation costs
    # more than the padded rows' MMAs (docs/perf-notes.md). Multiples of 8 only: at odd counts
    # ptxas serialises the kernel's MMAs (C7515).
    return num_heads % (8 if layout == "ds_mla" else BLOCK_M) == 0


def uses_kv_as_m(num_heads: int, layout: str | None) -> bool:
    """Below 64 heads, 16-bit caches and 656-byte rows stream through the ``kv_as_m`` kernel
    (64-token blocks on wgmma with the request's rows as N, so few rows cost no padded MMAs).
    ``OPENMLA_TILELANG_SCHEDULE`` pins it for A/B runs: ``kv_as_m`` puts every plan on it, a
    64-row schedule's name keeps every plan off it."""
    if layout not in CACHE_LAYOUTS:
        return False
    pinned = os.environ.get("OPENMLA_TILELANG_SCHEDULE")
    return pinned == KV_AS_M if pinned else num_heads < BLOCK_M


def plan_config(num_heads: int, max_rows: int, layout: str | None) -> DecodeConfig:
    """What plan() schedules a TileLang plan with: 64-row blocks, or for the ``kv_as_m`` kernel
    the request's rows rounded up to 16 or 32 (more take several row blocks)."""
    if not uses_kv_as_m(num_heads, layout):
        return PLAN_CONFIG
    block_m = 16 if max_rows <= 16 else 32
    pinned = os.environ.get("OPENMLA_KV_AS_M_BLOCK_M")  # A/B runs: 16 or 32
    if pinned:
        if pinned not in ("16", "32"):
            raise ValueError(f"OPENMLA_KV_AS_M_BLOCK_M must be 16 or 32, got {pinned!r}")
        block_m = int(pinned)
    return DecodeConfig(block_m=block_m, block_n=BLOCK_N, num_warps=4, num_stages=NUM_STAGES, kv_as_m=True)


def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)  # sm_90a: wgmma, setmaxnreg


# The first is the default: "seesaw" measured 173 / 631 us on W2 / W3 (H100, kernel alone)
# against 194 / 710 for TileLang's automatic warp specialisation ("auto_ws").
def _shape_vars():
    """The kernels' dynamic sizes (rows, cache slots, index entries, batch + 1, batch, work
    items, partial rows) and row strides (queries and caches may be views of wider [.., 576]
    buffers): one compiled kernel per (heads, page, dtype, causal, schedule) serves every batch."""
    import tilelang.language as T

    return (*T.dynamic("rows, slots, n_idx, batch1, batch, work, part_rows"),
            *T.dynamic("s_qn, s_qp, s_kv, s_kpe, s_o"))


SCHEDULES = ("seesaw", "seesaw_split", "auto_ws")  # of the 64-row (compute-bound) kernel


def _batched_reduce_pin(value: str | None) -> bool:
    """``OPENMLA_KV_AS_M_BATCHED_REDUCE``: ``0`` turns kv_as_m's batched reductions off (one
    reduction per column), ``1`` or unset leaves them on."""
    if value == "0":
        return False
    if value in (None, "", "1"):
        return True
    raise ValueError(f"OPENMLA_KV_AS_M_BATCHED_REDUCE must be 0 or 1, got {value!r}")


# kv_as_m's batched softmax reductions (build_kernel's ``batched_reduce``; bitwise the same results
# as one reduction per column), on: faster on every workload below 64 heads (H200: W5 108.6 ->
# 101.0 us). Two W5 benchmark processes stalled with them in session 13, before empty pieces
# stopped leaving a TMA load in flight (178b9e3); none since in 20 processes and 340 probe
# rounds (docs/perf-notes.md, sessions 14-15). The env pin is read once, here (A/B runs).
KV_AS_M_BATCHED_REDUCE = _batched_reduce_pin(os.environ.get("OPENMLA_KV_AS_M_BATCHED_REDUCE"))
KV_AS_M = "kv_as_m"  # the memory-bound kernel for few rows (_kv_as_m_func)
# 656-byte rows on kv_as_m with a converting warpgroup beside the MMA one (kv_as_m_fp8.py;
# build_kernel's ``converter``). Off: slower than the conversion on the MMA warpgroup's path (W8
# kernel 180 us against 166-170, H200, session 15; perf notes); kept for A/B runs.
KV_AS_M_FP8_CONVERTER = False
# 32-row kv_as_m tiles (16-bit caches) on two MMA warpgroups of 16 rows each (kv_as_m_split_rows.py;
# build_kernel's ``split_rows``). Off: slower than one warpgroup (W5 kernel 91.2 us against 83.0,
# H200, session 15; perf notes); kept for A/B runs.
KV_AS_M_SPLIT_ROWS = False
KV_AS_M_SPLIT_BLOCK_M = 32  # the tiles split_rows applies to
# Stages of kv_as_m's TMA loads over 656-byte rows at 16-row tiles (build_kernel's default
# ``num_stages`` there): 41 KB each (codes, scales, rope), three come to 218 KB of shared memory
# with the bf16 tile and Q (32-row tiles, with twice the Q, keep two; so do 16-bit caches, 72 KB
# a stage). Three: W8 kernel 160.5 us against 170.1 with two (H200, session 16; perf notes).
KV_AS_M_DS_MLA_STAGES = 3
KV_AS_M_DS_MLA_STAGE_BLOCK_M = 16  # the tiles KV_AS_M_DS_MLA_STAGES applies to


def _slot_of(kv_indices, page_base, start, page: int):
    """The cache slot of request-local token ``start`` (a KV block's rows lie in one page)."""
    return kv_indices[page_base + start // page] * page + start % page


def _schedule_name() -> str:
    return os.environ.get("OPENMLA_TILELANG_SCHEDULE") or SCHEDULES[0]


def build_kernel(num_heads: int, page_size: int, dtype: str, causal: bool, block_n: int = BLOCK_N,
                 num_stages: int | None = None, fast_math: bool = False, schedule: str | None = None,
                 ds_mla: bool = False, dq_early: int | None = None, block_m: int = BLOCK_M,
                 batched_reduce: bool | None = None, converter: bool | None = None,
                 split_rows: bool | None = None):
    """The compiled kernel for one (heads, page size, dtype, causal); the keyword arguments are
    tuning variants (benchmarks/bench_tilelang.py). ``schedule``: ``seesaw`` (the default;
    hand-scheduled warp specialisation: the consumer warpgroups take alternate KV blocks, so one's
    softmax runs under the other's MMAs; see :func:`_seesaw_func`), ``seesaw_split`` (the same with
    a barrier per third of a KV block, so S = Q K^T starts on the first third while the rest lands)
    or ``auto_ws`` (TileLang's automatic warp specialisation, softmax between the MMAs; the only
    one that takes other ``block_n`` / ``num_stages``); None reads ``OPENMLA_TILELANG_SCHEDULE``.
    ``num_stages`` None: two, but ``KV_AS_M_DS_MLA_STAGES`` for ``kv_as_m`` over 656-byte rows at
    16-row tiles, the one ``kv_as_m`` kernel that also takes three.
    ``ds_mla``: the cache is 656-byte fp8 rows (``seesaw`` only, bf16 queries); ``dq_early``: how
    many of its 16 dequantisation steps run before the P V they follow is issued (default
    ``DQ_EARLY``); ``batched_reduce`` (``kv_as_m``; default ``KV_AS_M_BATCHED_REDUCE``): the
    softmax's column max over the block's tokens as one batched cross-warp reduction (5 named
    barriers a block) instead of one per column a thread holds (5 each: 40 a block at 32 rows)."""
    if schedule is None:
        schedule = _schedule_name()
    if schedule not in (*SCHEDULES, KV_AS_M):
        raise ValueError(f"schedule must be one of {(*SCHEDULES, KV_AS_M)}, got {schedule!r}")
    if ds_mla and (schedule not in ("seesaw", KV_AS_M) or dtype != "bfloat16"):
        raise ValueError(f"656-byte fp8 rows need the seesaw or kv_as_m schedule and bf16 queries, got "
                         f"{schedule!r}, {dtype}")
    dq_early = DQ_EARLY if dq_early is None else int(dq_early)
    if not 0 <= dq_early <= DQ_STEPS:
        raise ValueError(f"dq_early must be in [0, {DQ_STEPS}], got {dq_early}")
    kv_as_m = schedule == KV_AS_M
    batched = bool(KV_AS_M_BATCHED_REDUCE if batched_reduce is None else batched_reduce) and kv_as_m
    converter = bool(KV_AS_M_FP8_CONVERTER if converter is None else converter) and kv_as_m and bool(ds_mla)
    split_rows = (bool(KV_AS_M_SPLIT_ROWS if split_rows is None else split_rows) and kv_as_m and not ds_mla
                  and block_m == KV_AS_M_SPLIT_BLOCK_M)
    staged = kv_as_m and ds_mla and block_m == KV_AS_M_DS_MLA_STAGE_BLOCK_M and not converter
    if num_stages is None:
        num_stages = KV_AS_M_DS_MLA_STAGES if staged else NUM_STAGES
    if kv_as_m and num_stages not in ((NUM_STAGES, 3) if staged else (NUM_STAGES,)):
        raise ValueError(f"num_stages {num_stages} does not fit this kv_as_m kernel's shared memory")
    return _build_kernel(num_heads, page_size, dtype, bool(causal), block_n, num_stages, fast_math, schedule,
                         bool(ds_mla), dq_early if ds_mla else DQ_STEPS, block_m if kv_as_m else BLOCK_M, batched,
                         converter, split_rows)


@functools.cache
def _build_kernel(num_heads: int, page_size: int, dtype: str, causal: bool, block_n: int,
                  num_stages: int, fast_math: bool, schedule: str, ds_mla: bool, dq_early: int,
                  block_m: int, batched_reduce: bool = False, converter: bool = False, split_rows: bool = False):
    import tilelang
    import tilelang.language as T

    configs = {tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: True} if fast_math else None
    # (build_kernel keeps converter / split_rows only where they apply)
    if split_rows:
        from openmla.kernels.kv_as_m_split_rows import separate_reduce_barriers, split_rows_func

        tilelang.register_cuda_postproc(separate_reduce_barriers)
        func = split_rows_func(num_heads, page_size, dtype, causal, batched_reduce)
        return tilelang.compile(func, target=_target(), execution_backend=_backend(), pass_configs=configs)
    if converter:
        from openmla.kernels.kv_as_m_fp8 import kv_as_m_converter_func

        func = kv_as_m_converter_func(num_heads, page_size, dtype, causal, block_m, batched_reduce)
        return tilelang.compile(func, target=_target(), execution_backend=_backend(), pass_configs=configs)
    if schedule == KV_AS_M:
        func = _kv_as_m_func(num_heads, page_size, dtype, causal, block_m, ds_mla, batched_reduce, num_stages)
        return tilelang.compile(func, target=_target(), execution_backend=_backend(), pass_configs=configs)
    if schedule in ("seesaw", "seesaw_split"):
        if block_n != BLOCK_N or num_stages != NUM_STAGES:
            raise ValueError("the seesaw schedules have fixed 64-token blocks in two stages")
        func = _seesaw_func(num_heads, page_size, dtype, causal, split_loads=schedule == "seesaw_split",
                            ds_mla=ds_mla, dq_early=dq_early)
        return tilelang.compile(func, target=_target(), execution_backend=_backend(), pass_configs=configs)

    H, PAGE = num_heads, page_size
    acc = "float32"
    rows, slots, n_idx, batch1, batch, work, part_rows, s_qn, s_qp, s_kv, s_kpe, s_o = _shape_vars()
    no_keys = _no_keys_store(BLOCK_M, dtype)

    @T.macro
    def attend(q_s, qp_s, kv_s, kpe_s, p_s, acc_s, acc_o, m_i, m_prev, alpha, l_blk, l_i,
               start, kv_end, kv_len_arr, qo_indptr_arr, i_b, tok0, scale_log2):
        T.gemm(q_s, kv_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol, clear_accum=True)
        T.gemm(qp_s, kpe_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullCol)
        for i, j in T.Parallel(BLOCK_M, block_n):
            if causal:
                # the bound is re-read from the arrays: a let-bound qo_len here trips TileLang's
                # warp-specialisation pass ("used before definition")
                shift = kv_len_arr[i_b] - (qo_indptr_arr[i_b + 1] - qo_indptr_arr[i_b])
                last = T.min(kv_end - 1, shift + tok0 + i // H)
            else:
                last = kv_end - 1
            acc_s[i, j] = T.if_then_else(start + j <= last, acc_s[i, j] * scale_log2,
                                         -T.infinity(acc))
        T.copy(m_i, m_prev)
        T.reduce_max(acc_s, m_i, dim=1, clear=False)
        for i in T.Parallel(BLOCK_M):
            # a row that has seen no key yet keeps m = -inf: use 0 as its offset
            alpha[i] = T.exp2(m_prev[i] - T.if_then_else(m_i[i] == -T.infinity(acc), 0, m_i[i]))
        for i, j in T.Parallel(BLOCK_M, block_n):
            acc_s[i, j] = T.exp2(acc_s[i, j] - T.if_then_else(
                m_i[i] == -T.infinity(acc), 0, m_i[i]))
        T.reduce_sum(acc_s, l_blk, dim=1)
        T.copy(acc_s, p_s)
        if start + block_n > kv_end:
            # slots past the range may hold NaN, and 0 * NaN would reach the output
            for i, j in T.Parallel(block_n, D_CKV):
                if start + i >= kv_end:
                    kv_s[i, j] = T.cast(0, dtype)
        for i in T.Parallel(BLOCK_M):
            l_i[i] = l_i[i] * alpha[i] + l_blk[i]
        for i, j in T.Parallel(BLOCK_M, D_CKV):
            acc_o[i, j] *= alpha[i]
        T.gemm(p_s, kv_s, acc_o, policy=T.GemmWarpPolicy.FullCol)

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
        # Row blocks of one piece are neighbours in launch order (x fastest): the second finds
        # the piece's KV in L2.
        with T.Kernel(row_blocks, work, threads=THREADS) as (i_m, i_w):
            q_s = T.alloc_shared([BLOCK_M, D_CKV], dtype)
            qp_s = T.alloc_shared([BLOCK_M, D_KPE], dtype)
            kv_s = T.alloc_shared([block_n, D_CKV], dtype)
            kpe_s = T.alloc_shared([block_n, D_KPE], dtype)
            p_s = T.alloc_shared([BLOCK_M, block_n], dtype)
            acc_s = T.alloc_fragment([BLOCK_M, block_n], acc)
            acc_o = T.alloc_fragment([BLOCK_M, D_CKV], acc)
            m_i = T.alloc_fragment([BLOCK_M], acc)
            m_prev = T.alloc_fragment([BLOCK_M], acc)
            alpha = T.alloc_fragment([BLOCK_M], acc)
            l_blk = T.alloc_fragment([BLOCK_M], acc)
            l_i = T.alloc_fragment([BLOCK_M], acc)
            lse_f = T.alloc_fragment([BLOCK_M], acc)

            i_b = work_req[i_w]
            q_begin = qo_indptr[T.max(i_b, 0)]
            qo_len = qo_indptr[T.max(i_b, 0) + 1] - q_begin
            if i_b >= 0 and i_m * BLOCK_M < qo_len * H and work_kv_begin[i_w] < work_kv_end[i_w]:
                kv_begin = work_kv_begin[i_w]
                kv_end = work_kv_end[i_w]
                part_row = work_part_row[i_w]
                page_base = kv_indptr[i_b]
                row0 = q_begin * H + i_m * BLOCK_M
                # request-local token of the block's first row; row r is token tok0 + r // H
                tok0 = i_m * BLOCK_M // H

                T.copy(Q[row0:row0 + BLOCK_M, :], q_s)
                T.copy(QP[row0:row0 + BLOCK_M, :], qp_s)
                T.fill(acc_o, 0)
                T.fill(l_i, 0)
                T.fill(m_i, -T.infinity(acc))

                n_blocks = T.ceildiv(kv_end - kv_begin, block_n)
                for k in T.Pipelined(n_blocks, num_stages=num_stages):
                    start = kv_begin + k * block_n
                    slot0 = _slot_of(kv_indices, page_base, start, PAGE)
                    T.copy(KV[slot0:slot0 + block_n, :], kv_s)
                    T.copy(KPE[slot0:slot0 + block_n, :], kpe_s)
                    attend(q_s, qp_s, kv_s, kpe_s, p_s, acc_s, acc_o, m_i, m_prev, alpha, l_blk, l_i,
                           start, kv_end, kv_len, qo_indptr, i_b, tok0, scale_log2)

                for i, j in T.Parallel(BLOCK_M, D_CKV):
                    acc_o[i, j] = acc_o[i, j] / T.if_then_else(l_i[i] > 0, l_i[i], 1)
                for i in T.Parallel(BLOCK_M):
                    lse_f[i] = T.if_then_else(l_i[i] > 0, (m_i[i] + T.log2(l_i[i])) * LN2,
                                              -T.infinity(acc))
                if part_row < 0:
                    T.copy(acc_o, Out[row0:row0 + BLOCK_M, :])
                    T.copy(lse_f, Lse[row0:row0 + BLOCK_M])
                else:
                    prow = part_row + i_m * BLOCK_M
                    T.copy(acc_o, PartO[prow:prow + BLOCK_M, :])
                    T.copy(lse_f, PartLse[prow:prow + BLOCK_M])
            elif i_b >= 0 and i_m * BLOCK_M < qo_len * H:
                no_keys(Out, Lse, PartO, PartLse, q_begin * H + i_m * BLOCK_M, i_m * BLOCK_M,
                        work_part_row[i_w], BLOCK_M)

    return tilelang.compile(decode, target=_target(), execution_backend=_backend(), pass_configs=configs)


def _no_keys_store(block_m: int, dtype: str):
    """The store of a piece with no keys (an empty request, or a pinned split's empty piece): zero
    output and lse -inf, from registers. Such a CTA loads nothing: one that exited with Q's TMA
    load still in flight would have it land in the shared memory (and on the barrier) of the
    next CTA on its SM."""
    import tilelang.language as T

    @T.macro
    def store(Out, Lse, PartO, PartLse, row0, rq0, part_row, valid):
        if part_row < 0:
            for i, c in T.Parallel(block_m, D_CKV):
                if i < valid:
                    Out[row0 + i, c] = T.cast(0, dtype)
            for i in T.Parallel(block_m):
                if i < valid:
                    Lse[row0 + i] = -T.infinity("float32")
        else:
            for i, c in T.Parallel(block_m, D_CKV):
                if i < valid:
                    PartO[part_row + rq0 + i, c] = T.cast(0, "float32")
            for i in T.Parallel(block_m):
                if i < valid:
                    PartLse[part_row + rq0 + i] = -T.infinity("float32")

    return store


def kv_as_m_store_rows(rows: int, first: int, batched_reduce: bool, dtype: str):
    """The rows' normalised output and lse, to ``Out``/``Lse`` (an unsplit request) or to the
    piece's partial rows; rows from ``valid`` on (past the request's) are not stored."""
    import tilelang.language as T

    acc = "float32"
    red_batch = rows // 4 if batched_reduce else 1

    @T.macro
    def store(l_t, l_i, o_t, m_i, lse_f, Out, Lse, PartO, PartLse, row0, rq0, part_row, valid):
        T.reduce_sum(l_t, l_i, dim=0, batch=red_batch)
        for c, r in T.Parallel(D_CKV, rows):
            o_t[c, r] = o_t[c, r] / T.if_then_else(l_i[r] > 0, l_i[r], 1)
        for r in T.Parallel(rows):
            lse_f[r] = T.if_then_else(l_i[r] > 0, (m_i[r] + T.log2(l_i[r])) * LN2, -T.infinity(acc))
        if part_row < 0:
            for r, c in T.Parallel(rows, D_CKV):
                if first + r < valid:
                    Out[row0 + first + r, c] = T.cast(o_t[c, r], dtype)
            for r in T.Parallel(rows):
                if first + r < valid:
                    Lse[row0 + first + r] = lse_f[r]
        else:
            for r, c in T.Parallel(rows, D_CKV):
                if first + r < valid:
                    PartO[part_row + rq0 + first + r, c] = o_t[c, r]
            for r in T.Parallel(rows):
                if first + r < valid:
                    PartLse[part_row + rq0 + first + r] = lse_f[r]

    return store


def _kv_as_m_func(num_heads: int, page_size: int, dtype: str, causal: bool, block_m: int,
                  ds_mla: bool = False, batched_reduce: bool = False, num_stages: int = NUM_STAGES):
    """The memory-bound kernel for few rows: the KV tokens are the products' M dimension,
    ``S^T = K Q^T`` [64, block_m] and ``O^T += V^T P^T`` [512, block_m], so a request's 4-32
    rows cost no padded MMA work (wgmma N = block_m), and one consumer warpgroup streams the
    KV while TileLang's producer warpgroup TMA-loads the next block. The softmax reduces over
    the tokens (axis 0). Same arguments and contract as the other schedules; the block's rows past
    its request's are computed from whatever Q rows follow (other requests', or TMA zeros) and
    not stored.

    ``ds_mla`` (656-byte fp8 rows, bf16 queries): ``KV`` is the e4m3 view of the rows' codes and
    ``KPE`` the bf16 view of their last 144 bytes, the four float32 group scales (as 8 bf16)
    then the rope. The producer loads codes, scales and rope by TMA; the consumer writes the
    block's bf16 latent, ``code * scale`` rounded once, into a shared tile the two products read.
    """
    import tilelang.language as T

    H, PAGE, BM, BN = num_heads, page_size, block_m, BLOCK_N
    acc = "float32"
    # each thread holds BM / 4 of a row's columns of the wgmma accumulator (4 warps over the M)
    red_batch = BM // 4 if batched_reduce else 1
    rows, slots, n_idx, batch1, batch, work, part_rows, s_qn, s_qp, s_kv, s_kpe, s_o = _shape_vars()
    kv_dtype = "float8_e4m3fn" if ds_mla else dtype
    kpe_width = DS_MLA_TAIL if ds_mla else D_KPE
    no_keys = _no_keys_store(BM, dtype)
    store = kv_as_m_store_rows(BM, 0, batched_reduce, dtype)

    @T.prim_func
    def decode(
        Q: T.StridedTensor([rows, D_CKV], (s_qn, 1), dtype),
        QP: T.StridedTensor([rows, D_KPE], (s_qp, 1), dtype),
        KV: T.StridedTensor([slots, D_CKV], (s_kv, 1), kv_dtype),
        KPE: T.StridedTensor([slots, kpe_width], (s_kpe, 1), dtype),
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
        # one consumer warpgroup (TileLang adds the producer); two fail to lower (the P V's
        # transposed V operand split over warpgroups is not a canonical wgmma layout)
        with T.Kernel(row_blocks, work, threads=128) as (i_m, i_w):
            q_s = T.alloc_shared([BM, D_CKV], dtype)
            qp_s = T.alloc_shared([BM, D_KPE], dtype)
            kv_s = T.alloc_shared([BN, D_CKV], dtype)
            kpe_s = T.alloc_shared([BN, D_KPE], dtype)
            p_s = T.alloc_shared([BN, BM], dtype)
            if ds_mla:
                T.import_source(_DS_MLA_SCALE_SOURCE)
                k8_s = T.alloc_shared([BN, D_CKV], kv_dtype)
                sc_s = T.alloc_shared([BN, DS_MLA_TAIL - D_KPE], dtype)  # 4 float32 as 8 bf16
                scl_s = T.alloc_shared([BN, DS_MLA_GROUPS], acc)
                kv_r = T.alloc_local([2], "int32")  # the piece's token range
                k8_f = T.alloc_fragment([BN, D_CKV], kv_dtype)
                scl_f = T.alloc_fragment([BN, D_CKV // 16], acc)
            s_t = T.alloc_fragment([BN, BM], acc)
            o_t = T.alloc_fragment([D_CKV, BM], acc)
            m_i = T.alloc_fragment([BM], acc)
            m_prev = T.alloc_fragment([BM], acc)
            alpha = T.alloc_fragment([BM], acc)
            l_t = T.alloc_fragment([BN, BM], acc)  # each thread's part of the row sums
            l_i = T.alloc_fragment([BM], acc)
            lse_f = T.alloc_fragment([BM], acc)

            i_b = work_req[i_w]
            q_begin = qo_indptr[T.max(i_b, 0)]
            qo_len = qo_indptr[T.max(i_b, 0) + 1] - q_begin
            if i_b >= 0 and i_m * BM < qo_len * H and work_kv_begin[i_w] < work_kv_end[i_w]:
                kv_begin = work_kv_begin[i_w]
                kv_end = work_kv_end[i_w]
                part_row = work_part_row[i_w]
                page_base = kv_indptr[i_b]
                row0 = q_begin * H + i_m * BM
                rq0 = i_m * BM  # request-local row of the block's first row
                valid = qo_len * H - rq0
                if ds_mla:
                    kv_r[0] = kv_begin
                    kv_r[1] = kv_end

                T.copy(Q[row0:row0 + BM, :], q_s)
                T.copy(QP[row0:row0 + BM, :], qp_s)
                T.fill(o_t, 0)
                T.fill(l_t, 0)
                T.fill(m_i, -T.infinity(acc))

                n_blocks = T.ceildiv(kv_end - kv_begin, BN)
                for k in T.Pipelined(n_blocks, num_stages=num_stages):
                    start = kv_begin + k * BN
                    slot0 = _slot_of(kv_indices, page_base, start, PAGE)
                    if ds_mla:
                        T.copy(KV[slot0:slot0 + BN, :], k8_s)
                        T.copy(KPE[slot0:slot0 + BN, 0:DS_MLA_TAIL - D_KPE], sc_s)
                        T.copy(KPE[slot0:slot0 + BN, DS_MLA_TAIL - D_KPE:DS_MLA_TAIL], kpe_s)
                        for j, g in T.Parallel(BN, DS_MLA_GROUPS):
                            scl_s[j, g] = T.call_extern(acc, "om_f32_of_bf16x2", sc_s[j, 2 * g], sc_s[j, 2 * g + 1])
                        # Codes and scales go to registers first: a loop that reads shared
                        # memory while it writes the tile gets a barrier per iteration.
                        T.copy(k8_s, k8_f)
                        for j, c16 in T.Parallel(BN, D_CKV // 16):
                            scl_f[j, c16] = scl_s[j, c16 // (DS_MLA_GROUP // 16)]
                        for j, c in T.Parallel(BN, D_CKV):
                            kv_s[j, c] = T.cast(T.cast(k8_f[j, c], acc) * scl_f[j, c // 16], dtype)
                        # Rows past the range are zeros (unused slots may hold NaN codes or
                        # scales). TileLang takes a shared-memory store that reads nothing but
                        # global memory (or nothing, like a constant) for a load, and would
                        # double-buffer the tile (more shared memory than an SM has): the range
                        # comes from registers and the store reads the tile.
                        if kv_r[0] + k * BN + BN > kv_r[1]:
                            for j, c in T.Parallel(BN, D_CKV):
                                kv_s[j, c] = T.if_then_else(kv_r[0] + k * BN + j < kv_r[1], kv_s[j, c],
                                                            T.cast(0, dtype))
                    else:
                        T.copy(KV[slot0:slot0 + BN, :], kv_s)
                        T.copy(KPE[slot0:slot0 + BN, :], kpe_s)
                    T.gemm(kv_s, q_s, s_t, transpose_B=True, clear_accum=True)
                    T.gemm(kpe_s, qp_s, s_t, transpose_B=True)
                    for j, i in T.Parallel(BN, BM):
                        if causal:
                            shift = kv_len[i_b] - (qo_indptr[i_b + 1] - qo_indptr[i_b])
                            last = T.min(kv_end - 1, shift + (rq0 + i) // H)
                        else:
                            last = kv_end - 1
                        s_t[j, i] = T.if_then_else(start + j <= last, s_t[j, i] * scale_log2,
                                                   -T.infinity(acc))
                    T.copy(m_i, m_prev)
                    T.reduce_max(s_t, m_i, dim=0, clear=False, batch=red_batch)
                    for i in T.Parallel(BM):
                        alpha[i] = T.exp2(m_prev[i] - T.if_then_else(m_i[i] == -T.infinity(acc), 0, m_i[i]))
                    for j, i in T.Parallel(BN, BM):
                        s_t[j, i] = T.exp2(s_t[j, i] - T.if_then_else(
                            m_i[i] == -T.infinity(acc), 0, m_i[i]))
                        # the row sums are reduced across threads once, after the loop
                        l_t[j, i] = l_t[j, i] * alpha[i] + s_t[j, i]
                    T.copy(s_t, p_s)
                    if not ds_mla and start + BN > kv_end:
                        # slots past the range may hold NaN, and 0 * NaN would reach the output
                        for j, c in T.Parallel(BN, D_CKV):
                            if start + j >= kv_end:
                                kv_s[j, c] = T.cast(0, dtype)
                    for c, i in T.Parallel(D_CKV, BM):
                        o_t[c, i] *= alpha[i]
                    T.gemm(kv_s, p_s, o_t, transpose_A=True)

                store(l_t, l_i, o_t, m_i, lse_f, Out, Lse, PartO, PartLse, row0, rq0, part_row, valid)
            elif i_b >= 0 and i_m * BM < qo_len * H:
                no_keys(Out, Lse, PartO, PartLse, q_begin * H + i_m * BM, i_m * BM, work_part_row[i_w],
                        qo_len * H - i_m * BM)

    return decode


DS_MLA_GROUP = 128  # latent channels per float32 scale
DS_MLA_GROUPS = D_CKV // DS_MLA_GROUP
DS_MLA_TAIL = 72  # a 656-byte row's last 144 bytes as bf16: 4 float32 scales (8), the rope (64)
# A float32 scale from the two bf16 halves it was read as (little-endian: low half first).
_DS_MLA_SCALE_SOURCE = r"""
template <typename T>
__device__ __forceinline__ float om_f32_of_bf16x2(T lo, T hi) {
  unsigned short l, h;
  memcpy(&l, &lo, 2);
  memcpy(&h, &hi, 2);
  return __uint_as_float(static_cast<unsigned>(l) | (static_cast<unsigned>(h) << 16));
}
"""


SEESAW_THREADS = 384  # warpgroups 0 and 1 consume, warpgroup 2 loads
SEESAW_CONSUMER_REGS = 240
SEESAW_PRODUCER_REGS = 24


# Device helpers of the 656-byte rows (``ds_mla``): 16 bytes of codes and one group scale from a
# row in global memory (zeros past the range, where unused slots may hold anything), and the
# dequantisation, bf16(float(code) * scale) as the Triton kernel computes it.
_DS_MLA_SOURCE = r"""
#include <cuda_fp8.h>
__device__ __forceinline__ void om_ldg16(unsigned* dst, const void* base, long long off, bool ok) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (ok) v = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(base) + off));
  dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
}
__device__ __forceinline__ void om_prefetch_l2(const void* base, long long off, unsigned bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;"
               :: "l"(reinterpret_cast<const char*>(base) + off), "r"(bytes) : "memory");
}
__device__ __forceinline__ float om_ldgf(const void* base, long long off, bool ok) {
  return ok ? __ldg(reinterpret_cast<const float*>(reinterpret_cast<const char*>(base) + off)) : 0.0f;
}
__device__ __forceinline__ unsigned om_dq2(unsigned short two, float s) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two), __NV_E4M3);
  float2 f = __half22float2(*reinterpret_cast<__half2*>(&h));
  __nv_bfloat162 b = __floats2bfloat162_rn(f.x * s, f.y * s);
  return *reinterpret_cast<unsigned*>(&b);
}
__device__ __forceinline__ void om_dq8(void* dst, unsigned w0, unsigned w1, float s) {
  unsigned* d = reinterpret_cast<unsigned*>(dst);
  d[0] = om_dq2(w0 & 0xffffu, s);
  d[1] = om_dq2(w0 >> 16, s);
  d[2] = om_dq2(w1 & 0xffffu, s);
  d[3] = om_dq2(w1 >> 16, s);
}
"""
DS_MLA_SCALES_AT = 512  # byte offset of a 656-byte row's four float32 group scales
# A warpgroup dequantises a block in 16 steps; in step ``it`` thread ``t`` takes 16 codes of
# token ``it // 2 * 8 + t // 16``, channels ``256 (it % 2) + 16 (t % 16)`` onwards (16 threads
# read 256 contiguous bytes).
DQ_STEPS = BLOCK_N * D_CKV // 16 // 128
DQ_EARLY = 12  # steps converted before the P V they follow is issued, the rest under it (W9 sweep)


def _seesaw_func(num_heads: int, page_size: int, dtype: str, causal: bool, split_loads: bool = False,
                 ds_mla: bool = False, dq_early: int = DQ_EARLY):
    """The kernel with a hand-written warp-specialised "seesaw" schedule (same arguments and
    contract as the ``auto_ws`` one).

    Warpgroup 2 loads Q once and the KV blocks by TMA into two stages (block ``k`` into stage
    ``k % 2``). Consumer warpgroup ``w`` owns the blocks ``k % 2 == w``: it computes their whole
    ``S = Q K^T`` (m64n64 MMAs over 576), their softmax, and publishes P (shared, one buffer),
    the new row max / sum and the rescale factor; each warpgroup accumulates the output columns
    ``[256 w, 256 w + 256)`` of every block, its own from P in registers, the other's from shared.
    The online softmax is a chain through the two warpgroups (block ``k`` starts from block
    ``k - 1``'s max); no cross-warpgroup reduction is needed, and S is one m64n64 MMA chain per
    block instead of two m64n32 ones (half the shared-memory operand traffic). What overlaps the
    softmax is the other warpgroup's P V MMAs; a deeper overlap (issuing block k + 1's S before
    block k's softmax) needs block k + 1 loaded, and with two 72 KB stages its stage is freed only
    when block k - 1's P V completes, so the loads, not the softmax, bound the schedule.
    Every wgmma wait is a full drain (``wait_group 0``) and no MMA sits under a condition: ptxas
    serialises every MMA of the kernel otherwise (C7514/C7515); hence the phantom block that
    pads an odd block count. Synchronisation (mbarriers): ``full[s]``
    (TMA landed), ``empty[s]`` (both consumers' MMAs reading stage ``s`` completed), ``ready[w]``
    (warpgroup ``w`` published a block). The single P buffer is safe because a warpgroup writes it
    only after its own MMA on the previous P completed, and that P was written after the other
    warpgroup's MMA on the one before completed. ``split_loads``: a ``full`` barrier per part of a
    block (V/K columns [0, 256), [256, 512), the rope part), in the order S = Q K^T consumes them.

    ``ds_mla`` (656-byte fp8 rows): the producer loads only the rope (bf16) by TMA, and prefetches
    the rows of the block after next into L2. Warpgroup ``w`` loads the e4m3 codes and group
    scales of its next block from global memory into registers and writes their bf16 values into
    the stage (once ``empty`` says the other warpgroup's P V on the stage's previous block
    completed), while it waits for the other's P, beside the other's S and softmax. Shared memory
    has no room for fp8 stages. Measured alternatives are in docs/perf-notes.md.
    """
    import tilelang.language as T

    H, PAGE = num_heads, page_size
    acc = "float32"
    HALF = D_CKV // 2
    BN = BLOCK_N
    ROW_POLICY = T.GemmWarpPolicy.FullRow
    rows, slots, n_idx, batch1, batch, work, part_rows, s_qn, s_qp, s_kv, s_kpe, s_o = _shape_vars()

    parts = 3 if split_loads else 1  # full barriers per stage
    # 656-byte rows at any head count: a request's rows padded to the 64-row block (Q rows past
    # them are other requests' or TMA zeros, computed and never stored)
    padded_rows = H % BLOCK_M != 0
    if ds_mla and split_loads:
        raise ValueError("656-byte fp8 rows have no split-load schedule")

    def convert_ops(w: int):
        """Warpgroup ``w``'s dequantisation of its block ``k`` (pair ``j``, stage ``w``), whose first
        slot is ``nslot[0]``: ``fetch`` loads the codes and scales into registers (rows past the
        range read as zeros: unused slots may hold NaN codes or scales), looks up block ``k + 2``'s
        slot for the next fetch and waits until the stage's previous block is consumed; ``store``
        writes the bf16 values of steps ``[lo, hi)``; ``publish`` makes them visible to the MMAs."""

        @T.macro
        def fetch(k, j, empty, KV, codes, scl, nslot, tw, kv_indices, page_base, kv_begin, kv_end, s_kv):
            start = kv_begin + k * BN
            for it in T.unroll(DQ_STEPS):
                row = T.cast(nslot[0] + it // 2 * 8 + tw // 16, "int64") * s_kv
                ok = start + it // 2 * 8 + tw // 16 < kv_end
                T.call_extern("handle", "om_ldg16", T.address_of(codes[4 * it]), T.access_ptr(KV, "r"),
                              row + it % 2 * HALF + tw % 16 * 16, ok)
                scl[it] = T.call_extern("float32", "om_ldgf", T.access_ptr(KV, "r"),
                                        row + DS_MLA_SCALES_AT + (2 * (it % 2) + tw % 16 // 8) * 4, ok)
            if start + 2 * BN < kv_end:
                nslot[0] = _slot_of(kv_indices, page_base, start + 2 * BN, PAGE)
            T.barrier_wait(empty[w], (j & 1) ^ 1)

        def store_steps(lo: int, hi: int):
            @T.macro
            def store(kl, kr, codes, scl, cv, tw):
                for it in T.unroll(lo, hi):
                    T.call_extern("handle", "om_dq8", T.address_of(cv[0]), codes[4 * it], codes[4 * it + 1],
                                  scl[it])
                    T.call_extern("handle", "om_dq8", T.address_of(cv[8]), codes[4 * it + 2],
                                  codes[4 * it + 3], scl[it])
                    for v in T.vectorized(16):
                        if it % 2 == 0:
                            kl[it // 2 * 8 + tw // 16, tw % 16 * 16 + v] = cv[v]
                        else:
                            kr[it // 2 * 8 + tw // 16, tw % 16 * 16 + v] = cv[v]

            return store

        @T.macro
        def publish():
            T.fence_proxy_async()
            T.sync_threads(8 + w, 128)

        return fetch, store_steps(0, dq_early), store_steps(dq_early, DQ_STEPS), publish

    conv_ops = convert_ops(0), convert_ops(1)

    def own_block(w: int):
        """Block ``k`` (stage ``w``) for its owner, warpgroup ``w``."""

        @T.macro
        def own(k, i, q_l, q_r, qp_s, kl, kr, kp, p_s, sm_s, sl_s, sa_s, full, empty, ready,
                acc_s, acc_p, acc_o, m_i, l_i, m_blk, l_blk, alpha, kv_begin, kv_end, shift, rq0,
                scale_log2):
            start = kv_begin + k * BN
            # the P V of block k - 1 (the other warpgroup's) completes first: its stage is released
            # at once, and no wgmma is in flight across a partial wait (ptxas would serialise them)
            T.wait_wgmma(0)
            if k > 0:
                T.barrier_arrive(empty[1 - w])
            T.barrier_wait(full[parts * w], i & 1)
            if not ds_mla and start + BN > kv_end:
                if split_loads:
                    T.barrier_wait(full[parts * w + 1], i & 1)
                # slots past the range may hold NaN, and 0 * NaN would reach the output; both
                # halves, since the other warpgroup multiplies P by its half of this block too
                for r, c in T.Parallel(BN, HALF):
                    if start + r >= kv_end:
                        kl[r, c] = T.cast(0, dtype)
                        kr[r, c] = T.cast(0, dtype)
                T.fence_proxy_async()
                T.sync_threads(8 + w, 128)
            T.wgmma_gemm(q_l, kl, acc_s, transpose_B=True, policy=ROW_POLICY, clear_accum=True)
            if split_loads:
                T.barrier_wait(full[parts * w + 1], i & 1)
            T.wgmma_gemm(q_r, kr, acc_s, transpose_B=True, policy=ROW_POLICY)
            if split_loads:
                T.barrier_wait(full[parts * w + 2], i & 1)
            T.wgmma_gemm(qp_s, kp, acc_s, transpose_B=True, policy=ROW_POLICY)
            T.wait_wgmma(0)
            T.warpgroup_fence_operand(acc_s, num_regs=BLOCK_M * BN // 128)
            for r, c in T.Parallel(BLOCK_M, BN):
                if causal:
                    acc_s[r, c] = T.if_then_else(
                        start + c <= T.min(kv_end - 1, shift + (rq0 + r) // H),
                        acc_s[r, c] * scale_log2, -T.infinity(acc))
                else:
                    acc_s[r, c] = T.if_then_else(start + c < kv_end, acc_s[r, c] * scale_log2,
                                                 -T.infinity(acc))
            T.reduce_max(acc_s, m_blk, dim=1)
            for r in T.Parallel(BLOCK_M):
                m_blk[r] = T.max(m_blk[r], m_i[r])
                # a row that has seen no key yet keeps m = -inf: use 0 as its offset
                alpha[r] = T.exp2(m_i[r] - T.if_then_else(m_blk[r] == -T.infinity(acc), 0, m_blk[r]))
                m_i[r] = m_blk[r]
            for r, c in T.Parallel(BLOCK_M, BN):
                acc_s[r, c] = T.exp2(acc_s[r, c] - T.if_then_else(
                    m_i[r] == -T.infinity(acc), 0, m_i[r]))
            T.reduce_sum(acc_s, l_blk, dim=1)
            for r in T.Parallel(BLOCK_M):
                l_i[r] = l_i[r] * alpha[r] + l_blk[r]
            T.copy(acc_s, acc_p)
            # the previous P (the other warpgroup's) was read by our P V, completed above
            T.copy(acc_p, p_s)
            for r in T.Parallel(BLOCK_M):
                sm_s[r] = m_i[r]
                sl_s[r] = l_i[r]
                sa_s[r] = alpha[r]
            T.fence_proxy_async()
            T.barrier_arrive(ready[w])
            for r, c in T.Parallel(BLOCK_M, HALF):
                acc_o[r, c] *= alpha[r]
            T.wgmma_gemm(acc_p, kl if w == 0 else kr, acc_o, policy=ROW_POLICY)

        return own

    def other_block(w: int):
        """Block ``k`` (stage ``1 - w``) for warpgroup ``w``, which does not own it."""

        @T.macro
        def other(k, i, v_half, p_s, sm_s, sl_s, sa_s, empty, ready, acc_o, m_i, l_i, alpha,
                  kl, kr, KV, codes, scl, cv, nslot, tw, kv_indices, page_base, kv_begin, kv_end,
                  s_kv, n_pairs):
            T.wait_wgmma(0)  # our P V of block k - 1 (stage w)
            if k > 0:
                T.barrier_arrive(empty[w])
            fetch, store_early, store_late, publish = conv_ops[w]
            # 656-byte rows: our next block (k + 1, stage w). Its loads fly while the other
            # warpgroup computes block k's S; steps [0, dq_early) are converted before our P V of
            # block k is issued, the rest under it
            if ds_mla and (w == 1 or i + 1 < n_pairs):  # (warpgroup 0's last block has no next)
                fetch(k + 1, i + 1 - w, empty, KV, codes, scl, nslot, tw, kv_indices, page_base, kv_begin,
                      kv_end, s_kv)
                store_early(kl, kr, codes, scl, cv, tw)
            T.barrier_wait(ready[1 - w], i & 1)
            for r in T.Parallel(BLOCK_M):
                m_i[r] = sm_s[r]
                l_i[r] = sl_s[r]
                alpha[r] = sa_s[r]
            T.warpgroup_fence_operand(acc_o, num_regs=BLOCK_M * HALF // 128)
            for r, c in T.Parallel(BLOCK_M, HALF):
                acc_o[r, c] *= alpha[r]
            T.wgmma_gemm(p_s, v_half, acc_o, policy=ROW_POLICY)
            if ds_mla and (w == 1 or i + 1 < n_pairs):
                store_late(kl, kr, codes, scl, cv, tw)
                publish()

        return other

    own0, own1 = own_block(0), own_block(1)
    other0, other1 = other_block(0), other_block(1)

    @T.macro
    def store_rows(w, acc_o, lse_f, Dst, DstLse, first, valid):
        """Warpgroup ``w``'s output columns of the block (and the lse, once) at row ``first``."""
        if padded_rows:
            # the block's rows past its request's (``valid``) belong to other requests or pieces
            for r, c in T.Parallel(BLOCK_M, HALF):
                if r < valid:
                    Dst[first + r, w * HALF + c] = T.cast(acc_o[r, c], Dst.dtype)
            if w == 0:
                for r in T.Parallel(BLOCK_M):
                    if r < valid:
                        DstLse[first + r] = lse_f[r]
        else:
            T.copy(acc_o, Dst[first:first + BLOCK_M, w * HALF:w * HALF + HALF])
            if w == 0:
                T.copy(lse_f, DstLse[first:first + BLOCK_M])

    @T.macro
    def epilogue(w, acc_o, m_i, l_i, lse_f, Out, Lse, PartO, PartLse, row0, part_row, i_m, valid):
        T.wait_wgmma(0)
        T.warpgroup_fence_operand(acc_o, num_regs=BLOCK_M * HALF // 128)
        for r, c in T.Parallel(BLOCK_M, HALF):
            acc_o[r, c] = acc_o[r, c] / T.if_then_else(l_i[r] > 0, l_i[r], 1)
        for r in T.Parallel(BLOCK_M):
            lse_f[r] = T.if_then_else(l_i[r] > 0, (m_i[r] + T.log2(l_i[r])) * LN2, -T.infinity(acc))
        if part_row < 0:
            store_rows(w, acc_o, lse_f, Out, Lse, row0, valid)
        else:
            store_rows(w, acc_o, lse_f, PartO, PartLse, part_row + i_m * BLOCK_M, valid)

    def load_stage(b: int):
        """The producer's load of block ``k`` into stage ``b``."""

        @T.macro
        def load(k, i, kl, kr, kp, full, empty, slot, KV, KPE, kv_indices, page_base, kv_begin,
                 n_blocks, s_kv, tp):
            # the page lookup (dependent global loads) runs before the wait, not on the critical path
            if k < n_blocks:
                slot[0] = _slot_of(kv_indices, page_base, kv_begin + k * BN, PAGE)
            T.barrier_wait(empty[b], (i & 1) ^ 1)
            if k < n_blocks:
                if split_loads:
                    T.tma_copy(KV[slot[0]:slot[0] + BN, 0:HALF], kl, barrier=full[parts * b],
                               annotations={"emit_arrive": 1})
                    T.tma_copy(KV[slot[0]:slot[0] + BN, HALF:D_CKV], kr, barrier=full[parts * b + 1],
                               annotations={"emit_arrive": 1})
                elif not ds_mla:  # (656-byte rows: the consumers load the codes and scales)
                    T.tma_copy(KV[slot[0]:slot[0] + BN, 0:HALF], kl, barrier=full[parts * b])
                    T.tma_copy(KV[slot[0]:slot[0] + BN, HALF:D_CKV], kr, barrier=full[parts * b])
                T.tma_copy(KPE[slot[0]:slot[0] + BN, :], kp, barrier=full[parts * b + parts - 1],
                           annotations={"emit_arrive": 1})
                # 656-byte rows: the block after next into L2 (its 64 rows are 42 KB in one page),
                # so the consumers' loads wait on L2, not HBM
                if ds_mla and k + 2 < n_blocks and tp == 0:
                    T.call_extern("handle", "om_prefetch_l2", T.access_ptr(KV, "r"),
                                  T.cast(_slot_of(kv_indices, page_base, kv_begin + (k + 2) * BN, PAGE), "int64")
                                  * s_kv, BN * s_kv)
            else:
                # a phantom block past the range (odd count): nothing to load, the owner masks it
                # whole (P = 0, its V rows zeroed, the max unchanged: alpha = 1)
                if T.shuffle_elect(128):
                    for part in T.unroll(parts):
                        T.barrier_arrive(full[parts * b + part])

        return load

    load0, load1 = load_stage(0), load_stage(1)

    # 656-byte rows: ``KV`` is the uint8 view of the codes (each row's group scales follow them,
    # at byte 512) and ``KPE`` the bf16 view of the rope (byte 528), two views of one cache
    kv_dtype = "uint8" if ds_mla else dtype

    @T.prim_func
    def decode(
        Q: T.StridedTensor([rows, D_CKV], (s_qn, 1), dtype),
        QP: T.StridedTensor([rows, D_KPE], (s_qp, 1), dtype),
        KV: T.StridedTensor([slots, D_CKV], (s_kv, 1), kv_dtype),
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
        with T.Kernel(row_blocks, work, threads=SEESAW_THREADS) as (i_m, i_w):
            q_l = T.alloc_shared([BLOCK_M, HALF], dtype)
            q_r = T.alloc_shared([BLOCK_M, HALF], dtype)
            qp_s = T.alloc_shared([BLOCK_M, D_KPE], dtype)
            kl0 = T.alloc_shared([BN, HALF], dtype)
            kr0 = T.alloc_shared([BN, HALF], dtype)
            kp0 = T.alloc_shared([BN, D_KPE], dtype)
            kl1 = T.alloc_shared([BN, HALF], dtype)
            kr1 = T.alloc_shared([BN, HALF], dtype)
            kp1 = T.alloc_shared([BN, D_KPE], dtype)
            p_s = T.alloc_shared([BLOCK_M, BN], dtype)
            sm_s = T.alloc_shared([BLOCK_M], acc)
            sl_s = T.alloc_shared([BLOCK_M], acc)
            sa_s = T.alloc_shared([BLOCK_M], acc)
            codes = scl = cv = nslot = None
            if ds_mla:
                T.import_source(_DS_MLA_SOURCE)
                codes = T.alloc_local([4 * DQ_STEPS], "uint32")
                scl = T.alloc_local([DQ_STEPS], acc)
                cv = T.alloc_local([16], dtype)
                nslot = T.alloc_local([1], "int32")

            acc_o0 = T.alloc_fragment([BLOCK_M, HALF], acc)
            acc_s0 = T.alloc_fragment([BLOCK_M, BN], acc)
            acc_p0 = T.alloc_fragment([BLOCK_M, BN], dtype)
            m_i0 = T.alloc_fragment([BLOCK_M], acc)
            l_i0 = T.alloc_fragment([BLOCK_M], acc)
            m_blk0 = T.alloc_fragment([BLOCK_M], acc)
            l_blk0 = T.alloc_fragment([BLOCK_M], acc)
            alpha0 = T.alloc_fragment([BLOCK_M], acc)
            lse0 = T.alloc_fragment([BLOCK_M], acc)
            acc_o1 = T.alloc_fragment([BLOCK_M, HALF], acc)
            acc_s1 = T.alloc_fragment([BLOCK_M, BN], acc)
            acc_p1 = T.alloc_fragment([BLOCK_M, BN], dtype)
            m_i1 = T.alloc_fragment([BLOCK_M], acc)
            l_i1 = T.alloc_fragment([BLOCK_M], acc)
            m_blk1 = T.alloc_fragment([BLOCK_M], acc)
            l_blk1 = T.alloc_fragment([BLOCK_M], acc)
            alpha1 = T.alloc_fragment([BLOCK_M], acc)
            lse1 = T.alloc_fragment([BLOCK_M], acc)

            # scalars held in registers: a global re-read after every barrier wait (memory
            # clobber) would sit on the critical path
            sc = T.alloc_local([5], "int32")
            slot = T.alloc_local([1], "int32")
            bar_q = T.alloc_barrier([1])
            full = T.alloc_barrier([1] * (2 * parts))
            empty = T.alloc_barrier([256, 256])
            ready = T.alloc_barrier([128, 128])

            tx = T.get_thread_binding()
            i_b = work_req[i_w]
            q_begin = qo_indptr[T.max(i_b, 0)]
            qo_len = qo_indptr[T.max(i_b, 0) + 1] - q_begin
            if i_b >= 0 and i_m * BLOCK_M < qo_len * H:
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
                row0 = q_begin * H + i_m * BLOCK_M
                rq0 = i_m * BLOCK_M  # request-local row of the block's first row (of token rq0 // H)
                valid = qo_len * H - rq0  # the request's rows from the block's first on (>= 64: all)
                n_blocks = T.ceildiv(kv_end - kv_begin, BN)
                n_pairs = T.ceildiv(n_blocks, 2)

                if tx < 128:
                    T.set_max_nreg(SEESAW_CONSUMER_REGS, 1)
                    T.fill(acc_o0, 0)
                    T.fill(l_i0, 0)
                    T.fill(m_i0, -T.infinity(acc))
                    T.barrier_wait(bar_q[0], 0)
                    if ds_mla and n_pairs > 0:  # an empty range loads nothing
                        nslot[0] = _slot_of(kv_indices, page_base, kv_begin, PAGE)
                        fetch0, store0_early, store0_late, publish0 = conv_ops[0]
                        fetch0(0, 0, empty, KV, codes, scl, nslot, tx, kv_indices, page_base, kv_begin,
                               kv_end, s_kv)
                        store0_early(kl0, kr0, codes, scl, cv, tx)
                        store0_late(kl0, kr0, codes, scl, cv, tx)
                        publish0()
                    for i in T.serial(n_pairs):
                        own0(2 * i, i, q_l, q_r, qp_s, kl0, kr0, kp0, p_s, sm_s, sl_s, sa_s, full,
                             empty, ready, acc_s0, acc_p0, acc_o0, m_i0, l_i0, m_blk0, l_blk0, alpha0,
                             kv_begin, kv_end, shift, rq0, scale_log2)
                        other0(2 * i + 1, i, kl1, p_s, sm_s, sl_s, sa_s, empty, ready, acc_o0,
                               m_i0, l_i0, alpha0, kl0, kr0, KV, codes, scl, cv, nslot, tx, kv_indices,
                               page_base, kv_begin, kv_end, s_kv, n_pairs)
                    epilogue(0, acc_o0, m_i0, l_i0, lse0, Out, Lse, PartO, PartLse, row0, part_row, i_m,
                             valid)
                elif tx >= 128 and tx < 256:
                    T.set_max_nreg(SEESAW_CONSUMER_REGS, 1)
                    T.fill(acc_o1, 0)
                    T.fill(l_i1, 0)
                    T.fill(m_i1, -T.infinity(acc))
                    T.barrier_wait(bar_q[0], 0)
                    if ds_mla and kv_begin + BN < kv_end:
                        nslot[0] = _slot_of(kv_indices, page_base, kv_begin + BN, PAGE)
                    for i in T.serial(n_pairs):
                        other1(2 * i, i, kr0, p_s, sm_s, sl_s, sa_s, empty, ready, acc_o1,
                               m_i1, l_i1, alpha1, kl1, kr1, KV, codes, scl, cv, nslot, tx - 128,
                               kv_indices, page_base, kv_begin, kv_end, s_kv, n_pairs)
                        own1(2 * i + 1, i, q_l, q_r, qp_s, kl1, kr1, kp1, p_s, sm_s, sl_s, sa_s,
                             full, empty, ready, acc_s1, acc_p1, acc_o1, m_i1, l_i1, m_blk1,
                             l_blk1, alpha1, kv_begin, kv_end, shift, rq0, scale_log2)
                    epilogue(1, acc_o1, m_i1, l_i1, lse1, Out, Lse, PartO, PartLse, row0, part_row, i_m,
                             valid)
                else:
                    T.set_max_nreg(SEESAW_PRODUCER_REGS, 0)
                    T.tma_copy(Q[row0:row0 + BLOCK_M, 0:HALF], q_l, barrier=bar_q[0])
                    T.tma_copy(Q[row0:row0 + BLOCK_M, HALF:D_CKV], q_r, barrier=bar_q[0])
                    T.tma_copy(QP[row0:row0 + BLOCK_M, :], qp_s, barrier=bar_q[0],
                               annotations={"emit_arrive": 1})
                    for i in T.serial(n_pairs):
                        load0(2 * i, i, kl0, kr0, kp0, full, empty, slot, KV, KPE, kv_indices,
                              page_base, kv_begin, n_blocks, s_kv, tx - 256)
                        load1(2 * i + 1, i, kl1, kr1, kp1, full, empty, slot, KV, KPE, kv_indices,
                              page_base, kv_begin, n_blocks, s_kv, tx - 256)

    return decode


def _target():
    # OPENMLA_TILELANG_ARCH compiles without a GPU (CPU checks of the generated code)
    arch = os.environ.get("OPENMLA_TILELANG_ARCH")
    return {"kind": "cuda", "arch": arch} if arch else "cuda"


def _backend() -> str:
    return "tvm_ffi"


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``[A, B, W]`` as a ``[A * B, W]`` view (rows at a fixed stride), or None when it is not one."""
    a, b, w = t.shape
    s0, s1, s2 = t.stride()
    if s2 != 1 or (a > 1 and s0 != b * s1):
        return None
    if (s1 * t.element_size()) % 16 or t.data_ptr() % 16:  # TMA: 16-byte strides
        return None
    return t.as_strided((a * b, w), (s1, 1))


def launch_decode_tilelang(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
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
    sm_scale: float,
    causal: bool,
    row_blocks: int,
    ds_mla: bool = False,
    block_m: int = BLOCK_M,
    **variant,
) -> bool:
    """Launch over ``[T, H, *]`` queries/output, ``[T, H]`` lse and ``[P, page, *]`` caches;
    returns False, launching nothing, when they cannot be addressed as the kernel's flat row
    arrays (rows not at one 16-byte stride, a strided lse, int64 page ids). ``ds_mla``: the
    caches are the e4m3 and rope views of 656-byte rows (``ops.kv_views``); the 64-row kernel
    reads the group scales at byte 512 of each e4m3 row, the ``kv_as_m`` one a bf16 view of the
    row from byte 512 on (scales, then rope)."""
    kv_as_m = variant.get("schedule") == KV_AS_M
    if ds_mla and kv_as_m:
        # the row's tail from the scales on (byte 512): 8 bf16 of scales, then the rope
        kpe_cache = kpe_cache.as_strided(kpe_cache.shape[:2] + (DS_MLA_TAIL,), kpe_cache.stride(),
                                         kpe_cache.storage_offset() - (DS_MLA_TAIL - D_KPE))
    elif ds_mla:
        ckv_cache = ckv_cache.view(torch.uint8)
    views = [_rows(t) for t in (q_nope, q_pe, ckv_cache, kpe_cache, out)]
    if any(v is None for v in views) or kv_indices.dtype != torch.int32 or lse.stride() != (lse.shape[1], 1):
        return False
    # the module's batched-reduce default is part of the key, so an A/B run may flip it between calls
    key = (q_nope.shape[1], ckv_cache.shape[1], q_nope.dtype, bool(causal), ds_mla, block_m,
           variant.get("schedule") or _schedule_name(), kv_as_m and KV_AS_M_BATCHED_REDUCE,
           kv_as_m and ds_mla and KV_AS_M_FP8_CONVERTER, kv_as_m and KV_AS_M_SPLIT_ROWS,
           kv_as_m and ds_mla and KV_AS_M_DS_MLA_STAGES, *variant.items())
    fn = _LAUNCH_FNS.get(key)
    if fn is None:
        dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[q_nope.dtype]
        fn = _entry(build_kernel(q_nope.shape[1], ckv_cache.shape[1], dtype, bool(causal), ds_mla=ds_mla,
                                 block_m=block_m, **variant))
        _LAUNCH_FNS[key] = fn
    qn, qp, ckv, kpe, out_rows = views
    fn(qn, qp, ckv, kpe, kv_indices, qo_indptr, kv_indptr, kv_len, work_req, work_kv_begin, work_kv_end,
       work_part_row, out_rows, lse.view(-1), part_o, part_lse, float(sm_scale * LOG2E), int(row_blocks))
    return True


# the entry of each launch key (:func:`_entry`), so a call skips build_kernel's checks and lookup
_LAUNCH_FNS: dict[tuple, object] = {}


def wrapper_launches() -> int:
    """How many launch keys go through TileLang's Python wrapper (not directly)."""
    return sum(1 for fn in _LAUNCH_FNS.values() if hasattr(fn, "adapter"))  # the kernel itself


def _entry(kernel):
    """The compiled kernel's TVM-FFI function, called directly: TileLang's Python wrapper around
    it (argument count, output allocation) adds host time to every launch, and a small batch's
    call waits on the host. Falls back to the wrapper (the kernel) on another TileLang's
    internals."""
    try:
        exe = kernel.adapter._get_executable()
        # a fresh compile holds an Executable to JIT; one loaded from TileLang's disk cache
        # (any process after the first) holds the loaded module itself
        return (exe.jit() if hasattr(exe, "jit") else exe).main
    except Exception:  # noqa: BLE001
        return kernel
