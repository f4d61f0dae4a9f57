"""``BatchMLAPagedAttentionWrapper``: FlashInfer's plan/run interface over openmla's kernels.

``plan()`` validates everything it can see and computes the split schedule on the host (it may
synchronise and allocate). ``run()`` only checks tensor metadata and launches: no host sync, no
allocation when ``out``/``lse`` are given, and no recompilation when lengths change (lengths are
data, never compile-time constants). With ``use_cuda_graph=True`` every device array has a fixed
address and the launch grids a fixed size, fixed at the first ``plan()``; later plans with the
same batch size rewrite the arrays in place, so a captured ``run()`` replays correctly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from openmla import config as _config
from openmla.fp8 import DS_MLA_BYTES
from openmla.kernels import decode_tilelang
from openmla.kernels.decode import KV_FP8_DS_MLA, KV_FP8_TENSOR, KV_PLAIN
from openmla.kernels.merge import PlannedMerge
from openmla.ops import (
    BACKEND_TILELANG,
    BACKEND_TRITON,
    PlanArrays,
    first_work_items,
    kv_views,
    meta_numel,
    paged_decode,
    partial_rows_capacity,
    run_planned_decode,
    slice_meta,
    slice_workspace,
)
from openmla.schedule import (
    KV_AS_M_SCHEDULE,
    TILELANG_SCHEDULE,
    build_schedule,
    cdiv,
    deterministic_pieces,
    work_capacity,
)
from openmla.tuning import decode_merge_config, decode_reduce_config, ordered_reduce_config
from openmla.validation import (
    ATTN_DTYPES,
    INDEX_DTYPES,
    check_indptr,
    check_int,
    check_shape,
    check_tensor,
    check_unit_last_stride,
)

D_CKV = 512
D_KPE = 64
MAX_HEADS = 128
CPU_NUM_SMS = 8  # nominal "SM" count when running under the CPU interpreter


@dataclass(frozen=True)
class _Plan:
    batch: int
    num_tokens: int
    num_heads: int
    page_size: int
    causal: bool
    sm_scale: float
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    kv_format: int  # KV_PLAIN, KV_FP8_TENSOR or KV_FP8_DS_MLA (kernels/decode.py)
    max_page: int  # largest page id the plan reads (-1: none); run() checks the cache holds it
    kv_indices: torch.Tensor
    arrays: PlanArrays
    sizes: list[int]  # [batch, work_capacity, token_capacity, partial_rows, row_blocks, merge_kernel]
    config: _config.DecodeConfig
    merge_config: _config.ReduceConfig  # the merge kernel's launch config
    num_pieces: int
    num_split_requests: int
    planned_merge: PlannedMerge | None  # the merge launch bound to this plan (eager run())


# the cache formats the TileLang kernels read, by their name there (decode_tilelang.CACHE_LAYOUTS)
_TILELANG_LAYOUTS = {KV_PLAIN: "plain", KV_FP8_DS_MLA: "ds_mla"}


class BatchMLAPagedAttentionWrapper:
    """Paged MLA decode with FlashInfer's ``plan``/``run`` interface.

    Args:
        float_workspace_buffer: device buffer (any dtype, contiguous) for fp32 split partials;
            128 MiB is plenty for 128 heads at batch 64. Its device is the device of every run.
        use_cuda_graph: fix device arrays and launch grids so ``run()`` can be captured in a CUDA
            graph and replayed after re-planning with the same batch size.
        qo_indptr, kv_indptr, kv_indices, kv_len_arr: optional caller-owned device buffers
            (``use_cuda_graph`` only) that ``plan()`` copies its arguments into; the kernels read
            ``kv_indices`` from there.
        backend: ``"auto"`` or ``"triton"`` (accepted for FlashInfer compatibility: ``"fa2"``,
            ``"fa3"`` also select openmla's kernels).
    """

    def __init__(
        self,
        float_workspace_buffer: torch.Tensor,
        use_cuda_graph: bool = False,
        qo_indptr: torch.Tensor | None = None,
        kv_indptr: torch.Tensor | None = None,
        kv_indices: torch.Tensor | None = None,
        kv_len_arr: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> None:
        check_tensor("float_workspace_buffer", float_workspace_buffer)
        if not float_workspace_buffer.is_contiguous():
            raise ValueError("float_workspace_buffer must be contiguous")
        if backend not in ("auto", "triton", "fa2", "fa3"):
            raise ValueError(f"backend must be 'auto', 'triton', 'fa2' or 'fa3', got {backend!r}")
        self._device = float_workspace_buffer.device
        self._workspace = float_workspace_buffer
        self._use_cuda_graph = bool(use_cuda_graph)
        self._bufs = {"qo_indptr": qo_indptr, "kv_indptr": kv_indptr, "kv_indices": kv_indices,
                      "kv_len_arr": kv_len_arr}
        for name, buf in self._bufs.items():
            if buf is not None:
                check_tensor(name, buf, dtypes=INDEX_DTYPES, ndim=1, device=self._device)
        ws_bytes = float_workspace_buffer.numel() * float_workspace_buffer.element_size()
        self._part_rows_capacity = partial_rows_capacity(ws_bytes, D_CKV)
        self._part_o, self._part_lse = slice_workspace(
            float_workspace_buffer, self._part_rows_capacity, D_CKV)
        self._meta: torch.Tensor | None = None
        self._counters: torch.Tensor | None = None
        self._graph_shape: tuple[int, int, int, int, _config.DecodeConfig] | None = None
        self._plan: _Plan | None = None
        self._kv_scale_buf = torch.ones(1, dtype=torch.float32, device=self._device)
        self._kv_scale_value = 1.0

    @property
    def device(self) -> torch.device:
        return self._device

    def _num_sms(self) -> int:
        if self._device.type == "cuda":
            return torch.cuda.get_device_properties(self._device).multi_processor_count
        return CPU_NUM_SMS

    def _backend(self, num_heads: int, page_size: int, kv_format: int,
                 decode_config: _config.DecodeConfig | None) -> int:
        """TileLang on Hopper when it is installed and serves the plan
        (``decode_tilelang.supports``: 16-bit caches or 656-byte rows below 64 heads, 16-bit caches
        at multiples of 64 heads, 656-byte rows at multiples of 8; pages of a multiple of 64),
        else Triton (see
        ``config.env_decode_backend`` for the override)."""
        choice = _config.env_decode_backend()
        if choice == "triton" or decode_config is not None:
            return BACKEND_TRITON
        layout = _TILELANG_LAYOUTS.get(kv_format)
        ok = decode_tilelang.supports(num_heads, page_size, layout, self._device)
        if choice == "tilelang" and not ok:
            raise ValueError(
                "OPENMLA_DECODE_BACKEND=tilelang needs tilelang installed, a Hopper GPU, a 16-bit "
                "cache or 656-byte fp8 rows (at 64+ heads: num_heads % 64 == 0, or % 8 for fp8 rows), "
                "and page_size % 64 == 0; "
                f"got num_heads={num_heads}, page_size={page_size}")
        return BACKEND_TILELANG if ok else BACKEND_TRITON

    def plan(
        self,
        qo_indptr: torch.Tensor,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        kv_len_arr: torch.Tensor,
        num_heads: int,
        head_dim_ckv: int,
        head_dim_kpe: int,
        page_size: int,
        causal: bool,
        sm_scale: float,
        q_data_type: torch.dtype,
        kv_data_type: torch.dtype,
        *,
        num_kv_heads: int = 1,
        num_splits: int | None = None,
        deterministic: bool = False,
        decode_config: _config.DecodeConfig | None = None,
    ) -> None:
        """Validate a batch and compute its split schedule.

        Args:
            qo_indptr: ``[B + 1]`` int32/int64, query-token offsets (``qo_len = 1`` for decode).
            kv_indptr: ``[B + 1]`` int32/int64, offsets of each request's pages in kv_indices.
            kv_indices: ``[>= kv_indptr[-1]]`` int32/int64 page ids, on the workspace's device.
            kv_len_arr: ``[B]`` int32/int64 tokens of each request (0 allowed).
            num_heads: query heads, 1..128. head_dim_ckv / head_dim_kpe: 512 / 64.
            page_size: tokens per page, >= 1 (any value, not only powers of two).
            causal: bottom-right aligned causal mask for ``qo_len > 1``.
            sm_scale: softmax scale applied to ``q . k``.
            q_data_type: torch.bfloat16 or torch.float16.
            kv_data_type: the cache format: ``q_data_type`` (16-bit cache);
                ``torch.float8_e4m3fn``: fp8 ``ckv``/``kpe`` caches with one scale, given to
                ``run(..., kv_scale=)``; ``torch.uint8``: DeepSeek V3.2's 656-byte rows (fp8
                latent, four float32 group scales, bf16 rope; bf16 queries), given to ``run`` as
                ``ckv_cache`` with ``kpe_cache=None``. See ``openmla.fp8``.
            num_kv_heads: latent heads (1 for MLA); num_heads must be a multiple of it.
            num_splits: pin every request to this many KV pieces (A/B runs and tests); default:
                the ``OPENMLA_NUM_SPLITS`` environment variable, else the balanced schedule.
            deterministic: batch-invariant mode: a request's ``out`` and ``lse`` are bitwise the
                same whatever else is in the batch (its KV is cut at fixed multiples of
                ``config.deterministic_chunk(num_heads)`` tokens, its softmax steps and row sums do
                not depend on the tile (``config.deterministic_config``), pieces merge in a fixed
                order). For RL rollouts and reproducible serving.
            decode_config: override the table's launch configuration (tuning runs).
        """
        num_heads = check_int("num_heads", num_heads, low=1, high=MAX_HEADS)
        num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=1)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, got {num_heads} and {num_kv_heads}")
        if num_kv_heads != 1:
            raise ValueError(f"num_kv_heads must be 1 (one latent head, MLA), got {num_kv_heads}")
        if head_dim_ckv != D_CKV:
            raise ValueError(f"head_dim_ckv must be {D_CKV}, got {head_dim_ckv}")
        if head_dim_kpe != D_KPE:
            raise ValueError(f"head_dim_kpe must be {D_KPE}, got {head_dim_kpe}")
        page_size = check_int("page_size", page_size, low=1)
        if not isinstance(sm_scale, (int, float)) or isinstance(sm_scale, bool):
            raise TypeError(f"sm_scale must be a float, got {type(sm_scale).__name__}")
        if not math.isfinite(sm_scale):
            raise ValueError(f"sm_scale must be finite, got {sm_scale}")
        if q_data_type not in ATTN_DTYPES:
            raise TypeError(f"q_data_type must be torch.bfloat16 or torch.float16, got {q_data_type}")
        kv_format = _kv_format(q_data_type, kv_data_type)
        if num_splits is None:
            num_splits = _config.env_num_splits()
        else:
            num_splits = check_int("num_splits", num_splits, low=1)

        for name, t in (("qo_indptr", qo_indptr), ("kv_indptr", kv_indptr),
                        ("kv_indices", kv_indices), ("kv_len_arr", kv_len_arr)):
            check_tensor(name, t, dtypes=INDEX_DTYPES, ndim=1)
        batch = kv_len_arr.numel()
        check_shape("qo_indptr", qo_indptr, (batch + 1,))
        check_shape("kv_indptr", kv_indptr, (batch + 1,))
        qo_host = qo_indptr.tolist()
        kv_ptr_host = kv_indptr.tolist()
        kv_len_host = kv_len_arr.tolist()
        check_indptr("qo_indptr", qo_host)
        check_indptr("kv_indptr", kv_ptr_host)
        if kv_ptr_host[-1] > kv_indices.numel():
            raise ValueError(
                f"kv_indices must hold kv_indptr[-1]={kv_ptr_host[-1]} entries, got {kv_indices.numel()}")
        qo_lens = [qo_host[b + 1] - qo_host[b] for b in range(batch)]
        indices_host = kv_indices.tolist()
        max_page = -1
        for b in range(batch):
            n, pages = kv_len_host[b], kv_ptr_host[b + 1] - kv_ptr_host[b]
            if n < 0:
                raise ValueError(f"kv_len_arr must be >= 0, got kv_len_arr[{b}]={n}")
            if n > pages * page_size:
                raise ValueError(
                    f"kv_len_arr[{b}]={n} exceeds the {pages} pages of {page_size} tokens that "
                    f"kv_indptr gives request {b}")
            if causal and qo_lens[b] > n:
                raise ValueError(
                    f"causal decode needs qo_len <= kv_len, got qo_len={qo_lens[b]} > "
                    f"kv_len_arr[{b}]={n} for request {b}")
            used = indices_host[kv_ptr_host[b]: kv_ptr_host[b] + cdiv(n, page_size)]
            if used:
                lo, hi = min(used), max(used)
                if lo < 0:
                    raise ValueError(f"kv_indices must be >= 0, got {lo} in request {b}")
                max_page = max(max_page, hi)

        num_tokens = qo_host[-1]
        max_rows = max(qo_lens, default=0) * num_heads
        backend = self._backend(num_heads, page_size, kv_format, decode_config)
        if backend == BACKEND_TILELANG:
            cfg = decode_tilelang.plan_config(num_heads, max_rows, _TILELANG_LAYOUTS[kv_format])
            sched_cfg, inline_max = (KV_AS_M_SCHEDULE if cfg.kv_as_m else TILELANG_SCHEDULE), 0
        else:
            if decode_config is not None:
                cfg = decode_config
            elif deterministic:  # the tile must not depend on the batch
                cfg = _config.deterministic_config(num_heads, max_rows, page_size, kv_format)
            else:
                cfg = _config.decode_config(max_rows, page_size, kv_format)
            sched_cfg, inline_max = _config.DEFAULT_SCHEDULE, _config.INLINE_MERGE_MAX
        row_blocks = max(1, cdiv(max_rows, cfg.block_m))
        num_sms = self._num_sms()
        det_pieces = (deterministic_pieces(qo_lens, kv_len_host, num_heads, num_sms, cfg.block_n, sched_cfg)
                      if deterministic and num_splits is None else None)
        if self._use_cuda_graph:
            if self._graph_shape is None:
                cap = work_capacity(batch, num_splits, num_sms, row_blocks, sched_cfg,
                                    deterministic_pieces=det_pieces)
                self._graph_shape = (batch, cap, num_tokens, row_blocks, cfg)
            g_batch, cap, tok_cap, g_row_blocks, g_cfg = self._graph_shape
            if batch != g_batch:
                raise ValueError(
                    f"use_cuda_graph: the batch size is fixed at {g_batch} by the first plan, got {batch}")
            if row_blocks > g_row_blocks or cfg != g_cfg:
                raise ValueError(
                    f"use_cuda_graph: qo_len * num_heads={max_rows} needs another launch shape than "
                    "the first plan; create a new wrapper")
            row_blocks = g_row_blocks
        else:
            cap = work_capacity(batch, num_splits, num_sms, row_blocks, sched_cfg,
                                deterministic_pieces=det_pieces)
            tok_cap = num_tokens
        sched = build_schedule(
            qo_lens, kv_len_host, num_heads, cfg.block_n, row_blocks, num_sms,
            self._part_rows_capacity, cap, tok_cap, num_splits=num_splits, sched=sched_cfg,
            deterministic=deterministic, inline_merge_max=inline_max)

        host_meta = torch.tensor(
            qo_host + kv_ptr_host + kv_len_host + sched.work_req + sched.work_kv_begin
            + sched.work_kv_end + sched.work_part_row + sched.work_num_parts + sched.work_part_base
            + sched.tok_part_row + sched.tok_num_parts
            + sched.tok_part_stride, dtype=torch.int32)
        assert host_meta.numel() == meta_numel(batch, cap, tok_cap)
        if self._use_cuda_graph and self._meta is not None:
            self._meta.copy_(host_meta)
        else:
            self._meta = host_meta.to(self._device)
        kv_indices_dev = self._device_indices(kv_indices, qo_indptr, kv_indptr, kv_len_arr)
        if self._counters is None or self._counters.numel() < batch * row_blocks:
            # arrival counters of the in-kernel merge; every launch leaves them at zero again
            self._counters = torch.zeros(max(1, batch * row_blocks), dtype=torch.int32, device=self._device)
        merge_point = (max(sched.merge_kernel_tokens, 1), num_heads, D_CKV, max(sched.merge_kernel_pieces, 2))
        if self._use_cuda_graph:  # baked into the captured graph: fixed by the head count
            merge_config = decode_reduce_config(num_heads, D_CKV, self._device, backend == BACKEND_TILELANG)
            if deterministic:
                merge_config = dataclasses.replace(merge_config, ordered=True)
        elif deterministic:  # pieces added in order: the same bits whatever config this batch gets
            merge_config = ordered_reduce_config(*merge_point, self._device)
        else:
            merge_config = decode_merge_config(*merge_point, self._device)
        arrays = self._launch_arrays(slice_meta(self._meta, batch, cap, tok_cap), sched.num_pieces)
        merge_kernel = int(self._use_cuda_graph or sched.merge_kernel_tokens > 0)
        planned_merge = None
        if merge_kernel:
            planned_merge = PlannedMerge(self._part_o, self._part_lse, (arrays.tok_part_row, arrays.tok_num_parts,
                                         arrays.tok_part_stride), arrays.tok_num_parts.numel(), merge_config)
        self._plan = _Plan(
            batch=batch, num_tokens=num_tokens, num_heads=num_heads, page_size=page_size,
            causal=bool(causal), sm_scale=float(sm_scale), q_dtype=q_data_type,
            kv_dtype=kv_data_type, kv_format=kv_format, max_page=max_page, kv_indices=kv_indices_dev,
            arrays=arrays, sizes=[batch, cap, tok_cap, self._part_rows_capacity, row_blocks, merge_kernel, backend],
            config=cfg, merge_config=merge_config, num_pieces=sched.num_pieces,
            num_split_requests=sched.split_requests, planned_merge=planned_merge,
        )

    def _launch_arrays(self, arrays: PlanArrays, num_pieces: int) -> PlanArrays:
        """What eager ``run()`` launches over: the real pieces only, so the grid has no padding
        programs (each is still scheduled, and takes its prologue on an SM the real ones left
        free: ~1000 of them in a batch-invariant plan). A graph keeps the fixed grid."""
        if self._use_cuda_graph:
            return arrays
        return first_work_items(arrays, max(num_pieces, 1))

    def _device_indices(self, kv_indices: torch.Tensor, qo_indptr: torch.Tensor,
                        kv_indptr: torch.Tensor, kv_len_arr: torch.Tensor) -> torch.Tensor:
        """kv_indices as the kernels will read it; fills caller-owned graph buffers."""
        if not self._use_cuda_graph:
            return kv_indices.to(self._device)
        for name, src in (("qo_indptr", qo_indptr), ("kv_indptr", kv_indptr),
                          ("kv_len_arr", kv_len_arr)):
            buf = self._bufs[name]
            if buf is not None:
                if buf.numel() < src.numel():
                    raise ValueError(f"the {name} buffer holds {buf.numel()} entries, plan got {src.numel()}")
                buf[: src.numel()].copy_(src)
        buf = self._bufs["kv_indices"]
        if buf is None:
            buf = self._bufs["kv_indices"] = torch.empty_like(kv_indices, device=self._device)
        if buf.numel() < kv_indices.numel():
            raise ValueError(
                f"the kv_indices buffer holds {buf.numel()} entries, plan got {kv_indices.numel()}")
        buf[: kv_indices.numel()].copy_(kv_indices)
        return buf

    def run(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        ckv_cache: torch.Tensor,
        kpe_cache: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
        return_lse: bool = False,
        *,
        kv_scale: float | torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the planned decode.

        Args:
            q_nope: ``[T, H, 512]``, q_pe: ``[T, H, 64]`` in the planned q dtype (T = qo_indptr[-1]).
            ckv_cache: ``[num_pages, page_size, 512]``, kpe_cache: ``[num_pages, page_size, 64]``
                in the planned kv dtype; separate tensors or strided views of one
                ``[num_pages, page_size, 576]`` buffer (unit stride in the last dimension).
                With ``kv_data_type=torch.uint8``: ``ckv_cache`` is the ``uint8 [num_pages,
                page_size, 656]`` cache and ``kpe_cache`` is None.
            out: optional ``[T, H, 512]`` output in q's dtype. lse: optional ``[T, H]`` float32.
            return_lse: also return the LSE.
            kv_scale: ``kv_data_type=torch.float8_e4m3fn`` only: the cache's dequantisation
                scale (cache value = fp8 code * kv_scale), a float or a float32 tensor of one
                element on the device (a tensor keeps CUDA graphs and torch.compile free of
                host values).

        Returns:
            ``out`` (and ``lse`` if ``return_lse``): ``lse`` is the natural-log log-sum-exp of the
            scaled scores, float32. Empty requests give ``out = 0`` and ``lse = -inf``.
        """
        p = self._plan
        if p is None:
            raise ValueError("run() called before plan()")
        dev = self._device
        if kv_scale is None and self._common_call(p, q_nope, q_pe, ckv_cache, kpe_cache, out, lse):
            scale_t = None  # every check below would pass
        else:
            check_tensor("q_nope", q_nope, dtypes=(p.q_dtype,), ndim=3, device=dev)
            check_tensor("q_pe", q_pe, dtypes=(p.q_dtype,), ndim=3, device=dev)
            check_shape("q_nope", q_nope, (p.num_tokens, p.num_heads, D_CKV))
            check_shape("q_pe", q_pe, (p.num_tokens, p.num_heads, D_KPE))
            num_pages = self._check_caches(p, ckv_cache, kpe_cache)
            scale_t = self._kv_scale_tensor(p, kv_scale)
            # Checked in eager mode only: under torch.compile a guard on the plan's max_page would
            # recompile whenever a request enters a new page (the plan validated the indices).
            if not torch.compiler.is_compiling() and p.max_page >= num_pages:
                raise ValueError(
                    f"kv_indices reads page {p.max_page}, the caches hold {num_pages} pages")
            for name, t in (("q_nope", q_nope), ("q_pe", q_pe)):
                check_unit_last_stride(name, t)
            if out is not None:
                check_tensor("out", out, dtypes=(p.q_dtype,), device=dev)
                check_shape("out", out, (p.num_tokens, p.num_heads, D_CKV))
                check_unit_last_stride("out", out)
            if lse is not None:
                check_tensor("lse", lse, dtypes=(torch.float32,), device=dev)
                check_shape("lse", lse, (p.num_tokens, p.num_heads))
                check_unit_last_stride("lse", lse)
        if out is None:
            out = torch.empty_like(q_nope, memory_format=torch.contiguous_format)
        if lse is None:
            lse = torch.empty((p.num_tokens, p.num_heads), dtype=torch.float32, device=dev)

        if torch.compiler.is_compiling():
            paged_decode(q_nope, q_pe, ckv_cache, kpe_cache, scale_t, p.kv_format, p.kv_indices,
                         self._meta, self._workspace, self._counters, out, lse, p.sizes, p.sm_scale,
                         p.causal, [int(v) for v in (*dataclasses.astuple(p.config),
                                                     *dataclasses.astuple(p.merge_config))])
        else:
            ckv, kpe, scales = kv_views(p.kv_format, ckv_cache, kpe_cache, scale_t)
            run_planned_decode(q_nope, q_pe, ckv, kpe, scales, p.kv_format, p.kv_indices, p.arrays,
                               self._part_o, self._part_lse, out, lse, self._counters, p.sm_scale,
                               p.causal, p.sizes[4], p.config, bool(p.sizes[5]), p.sizes[6],
                               p.merge_config, p.planned_merge)
        return (out, lse) if return_lse else out

    def _common_call(self, p: _Plan, q_nope, q_pe, ckv_cache, kpe_cache, out, lse) -> bool:
        """Whether the arguments are what the plan expects, in one pass of plain comparisons (a
        decode step calls ``run()`` once per layer: the host time adds to every call). False
        sends them through the checks that name what is wrong."""
        if p.kv_format == KV_FP8_TENSOR or torch.compiler.is_compiling():
            return False
        dev, qd = self._device, p.q_dtype
        rows = (p.num_tokens, p.num_heads)
        try:
            ok = (q_nope.dtype is qd and q_pe.dtype is qd and q_nope.device == dev and q_pe.device == dev
                  and q_nope.shape == (*rows, D_CKV) and q_pe.shape == (*rows, D_KPE)
                  and q_nope.stride(2) == 1 and q_pe.stride(2) == 1
                  and ckv_cache.device == dev and ckv_cache.dim() == 3 and ckv_cache.stride(2) == 1
                  and p.max_page < ckv_cache.shape[0]
                  and (out is None or (out.dtype is qd and out.device == dev and out.shape == q_nope.shape
                                       and out.stride(2) == 1))
                  and (lse is None or (lse.dtype is torch.float32 and lse.device == dev
                                       and lse.shape == rows and lse.stride(-1) == 1)))
            if not ok:
                return False
            if p.kv_format == KV_FP8_DS_MLA:
                return (kpe_cache is None and ckv_cache.dtype is torch.uint8
                        and ckv_cache.shape[1:] == (p.page_size, DS_MLA_BYTES)
                        and ckv_cache.stride(0) % 16 == 0 and ckv_cache.stride(1) % 16 == 0)
            kd = p.kv_dtype
            return (ckv_cache.dtype is kd and kpe_cache.dtype is kd and kpe_cache.device == dev
                    and ckv_cache.shape[1:] == (p.page_size, D_CKV)
                    and kpe_cache.shape == (ckv_cache.shape[0], p.page_size, D_KPE) and kpe_cache.stride(2) == 1)
        except (AttributeError, TypeError):  # not tensors: the checks say which
            return False

    def _check_caches(self, p: _Plan, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor | None) -> int:
        """Check the caches against the plan's format; returns the number of pages."""
        dev = self._device
        if p.kv_format == KV_FP8_DS_MLA:
            check_tensor("ckv_cache", ckv_cache, dtypes=(torch.uint8,), ndim=3, device=dev)
            num_pages = ckv_cache.shape[0]
            check_shape("ckv_cache", ckv_cache, (num_pages, p.page_size, DS_MLA_BYTES))
            check_unit_last_stride("ckv_cache", ckv_cache)
            if ckv_cache.stride(0) % 16 or ckv_cache.stride(1) % 16:
                raise ValueError(
                    "ckv_cache (656-byte rows) needs page and token strides that are multiples of "
                    f"16 bytes, got {ckv_cache.stride()}")
            if kpe_cache is not None:
                raise ValueError("kpe_cache must be None with kv_data_type=torch.uint8 (the rope "
                                 "is inside the 656-byte rows of ckv_cache)")
            return num_pages
        if kpe_cache is None:
            raise TypeError("kpe_cache must be a torch.Tensor, got NoneType")
        check_tensor("ckv_cache", ckv_cache, dtypes=(p.kv_dtype,), ndim=3, device=dev)
        check_tensor("kpe_cache", kpe_cache, dtypes=(p.kv_dtype,), ndim=3, device=dev)
        num_pages = ckv_cache.shape[0]
        check_shape("ckv_cache", ckv_cache, (num_pages, p.page_size, D_CKV))
        check_shape("kpe_cache", kpe_cache, (num_pages, p.page_size, D_KPE))
        check_unit_last_stride("ckv_cache", ckv_cache)
        check_unit_last_stride("kpe_cache", kpe_cache)
        return num_pages

    def _kv_scale_tensor(self, p: _Plan, kv_scale: float | torch.Tensor | None) -> torch.Tensor | None:
        """``kv_scale`` as a float32 device tensor of one element (per-tensor fp8 only)."""
        if p.kv_format != KV_FP8_TENSOR:
            if kv_scale is not None:
                raise ValueError(f"kv_scale is only for kv_data_type=torch.float8_e4m3fn, the plan has "
                                 f"{p.kv_dtype}")
            return None
        if kv_scale is None:
            raise ValueError("kv_scale is required with kv_data_type=torch.float8_e4m3fn")
        if isinstance(kv_scale, torch.Tensor):
            check_tensor("kv_scale", kv_scale, dtypes=(torch.float32,), device=self._device)
            if kv_scale.numel() != 1:
                raise ValueError(f"kv_scale must hold one element, got shape {tuple(kv_scale.shape)}")
            return kv_scale
        if isinstance(kv_scale, bool) or not isinstance(kv_scale, (int, float)):
            raise TypeError(f"kv_scale must be a float or a float32 tensor, got {type(kv_scale).__name__}")
        if not math.isfinite(kv_scale):
            raise ValueError(f"kv_scale must be finite, got {kv_scale}")
        if torch.compiler.is_compiling():
            return torch.full((1,), float(kv_scale), dtype=torch.float32, device=self._device)
        # a float is copied to a device buffer only when it changes (no per-call transfer)
        if self._kv_scale_value != float(kv_scale):
            self._kv_scale_buf.fill_(float(kv_scale))
            self._kv_scale_value = float(kv_scale)
        return self._kv_scale_buf

    @property
    def backend(self) -> str:
        """The decode kernel the current plan launches: ``"triton"`` or ``"tilelang"``."""
        if self._plan is None:
            raise ValueError("backend needs a plan() first")
        return "tilelang" if self._plan.sizes[6] == BACKEND_TILELANG else "triton"

    @property
    def plan_info(self) -> dict[str, int]:
        """Schedule figures of the current plan (pieces, split requests, grid size)."""
        p = self._plan
        if p is None:
            raise ValueError("plan_info needs a plan() first")
        return {"pieces": p.num_pieces, "split_requests": p.num_split_requests,
                "work_capacity": p.sizes[1], "row_blocks": p.sizes[4],
                "block_m": p.config.block_m, "block_n": p.config.block_n}


def _kv_format(q_data_type: torch.dtype, kv_data_type: torch.dtype) -> int:
    if kv_data_type == torch.uint8:
        if q_data_type != torch.bfloat16:
            raise TypeError(f"kv_data_type=torch.uint8 (656-byte fp8 rows) needs q_data_type "
                            f"torch.bfloat16, got {q_data_type}")
        return KV_FP8_DS_MLA
    if kv_data_type == torch.float8_e4m3fn:
        return KV_FP8_TENSOR
    if kv_data_type != q_data_type:
        raise TypeError(f"kv_data_type must be q_data_type ({q_data_type}), torch.float8_e4m3fn or "
                        f"torch.uint8, got {kv_data_type}")
    return KV_PLAIN
