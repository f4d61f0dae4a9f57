"""The decode as one ``torch.library`` custom op, so ``torch.compile(fullgraph=True)`` traces a
model that calls ``BatchMLAPagedAttentionWrapper.run``.

The op writes into caller-provided ``out`` / ``lse`` and into the wrapper's workspace; its fake
implementation does nothing. Plan-time state travels as one int32 ``meta`` tensor plus a few
ints (``sizes``) that fix its layout; :func:`slice_meta` is the single definition of that
layout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from openmla.config import DecodeConfig, ReduceConfig
from openmla.kernels.decode import KV_FP8_DS_MLA, KV_FP8_TENSOR, launch_decode
from openmla.kernels.decode_tilelang import KV_AS_M, launch_decode_tilelang
from openmla.kernels.merge import PlannedMerge, launch_merge

BACKEND_TRITON = 0
BACKEND_TILELANG = 1


def kv_views(
    kv_format: int, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor | None,
    kv_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The typed views the decode kernel reads: ``(ckv, kpe, scales)``.

    656-byte format: ``ckv_cache`` is ``uint8 [P, page, 656]``; the latent is its float8 view,
    the group scales its float32 view at byte 512 and the rope its bf16 view at byte 528 (each a
    strided view of the same bytes, nothing is copied). Per-tensor fp8: the caches as given and
    the ``[1]`` float32 scale. Plain: a dummy ``scales`` the kernel never reads."""
    if kv_format == KV_FP8_DS_MLA:
        ckv = ckv_cache.view(torch.float8_e4m3fn)[..., :512]
        scales = ckv_cache.view(torch.float32)[..., 128:132]
        kpe = ckv_cache.view(torch.bfloat16)[..., 264:328]
        return ckv, kpe, scales
    if kv_format == KV_FP8_TENSOR:
        return ckv_cache, kpe_cache, kv_scale.view(1, 1, 1)
    return ckv_cache, kpe_cache, None


class PlanArrays(NamedTuple):
    """Device views of a plan (see schedule.py for what each array means)."""

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_len: torch.Tensor
    work_req: torch.Tensor
    work_kv_begin: torch.Tensor
    work_kv_end: torch.Tensor
    work_part_row: torch.Tensor
    work_num_parts: torch.Tensor
    work_part_base: torch.Tensor
    tok_part_row: torch.Tensor
    tok_num_parts: torch.Tensor
    tok_part_stride: torch.Tensor


def _meta_lengths(batch: int, work_capacity: int, token_capacity: int) -> list[int]:
    return [batch + 1, batch + 1, batch] + [work_capacity] * 6 + [token_capacity] * 3


def meta_numel(batch: int, work_capacity: int, token_capacity: int) -> int:
    return sum(_meta_lengths(batch, work_capacity, token_capacity))


def slice_meta(meta: torch.Tensor, batch: int, work_capacity: int, token_capacity: int) -> PlanArrays:
    lengths = _meta_lengths(batch, work_capacity, token_capacity)
    return PlanArrays(*torch.split(meta[: sum(lengths)], lengths))


def first_work_items(arrays: PlanArrays, count: int) -> PlanArrays:
    """The plan's arrays with the work list cut to its first ``count`` items (the decode's grid
    follows the work list's length; a schedule puts its padding items last)."""
    return arrays._replace(**{f: getattr(arrays, f)[:count] for f in arrays._fields if f.startswith("work_")})


def partial_rows_capacity(workspace_bytes: int, d_ckv: int) -> int:
    """fp32 partial rows the workspace holds; capped so every partial offset fits int32."""
    return min(workspace_bytes // (4 * (d_ckv + 1)), (2**31 - 1) // d_ckv)


def slice_workspace(workspace: torch.Tensor, rows: int, d_ckv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial outputs ``[rows, d_ckv]`` and partial LSEs ``[rows]`` inside the workspace."""
    flat = workspace.view(torch.uint8)[: 4 * rows * (d_ckv + 1)].view(torch.float32)
    return flat[: rows * d_ckv].view(rows, d_ckv), flat[rows * d_ckv :]


def run_planned_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    scales: torch.Tensor | None,
    kv_format: int,
    kv_indices: torch.Tensor,
    arrays: PlanArrays,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    counters: torch.Tensor,
    sm_scale: float,
    causal: bool,
    row_blocks: int,
    config: DecodeConfig,
    merge_kernel: bool,
    backend: int = BACKEND_TRITON,
    merge_config: ReduceConfig | None = None,
    planned_merge: PlannedMerge | None = None,
) -> None:
    """Launch the split-KV decode (which merges requests of few pieces itself), then, when the
    plan has requests of many pieces, the merge kernel. ``BACKEND_TILELANG`` plans merge every
    split request in the merge kernel, so the Triton kernel can stand in for the TileLang one
    (queries or output whose rows cannot be addressed as one flat array). ``merge_config``: the
    merge kernel's launch config (None: the fixed batch-independent one); ``planned_merge``: the
    same launch bound to the plan (``part_o``, ``part_lse``, the reduce map and ``merge_config``),
    which launches it with less host time."""
    launched = backend == BACKEND_TILELANG and launch_decode_tilelang(
        q_nope, q_pe, ckv_cache, kpe_cache, out, lse, part_o, part_lse, arrays.qo_indptr,
        arrays.kv_indptr, kv_indices, arrays.kv_len, arrays.work_req, arrays.work_kv_begin,
        arrays.work_kv_end, arrays.work_part_row, sm_scale, causal, row_blocks,
        ds_mla=kv_format == KV_FP8_DS_MLA, block_m=config.block_m,
        schedule=KV_AS_M if config.kv_as_m else None)
    if not launched:
        _launch_triton_decode(q_nope, q_pe, ckv_cache, kpe_cache, scales, kv_format, kv_indices, arrays,
                              part_o, part_lse, out, lse, counters, sm_scale, causal, row_blocks, config)
    if not merge_kernel:
        return
    if planned_merge is not None:
        planned_merge(out, lse)
        return
    launch_merge(
        part_o=part_o,
        part_lse=part_lse,
        out=out,
        lse=lse,
        tok_part_row=arrays.tok_part_row,
        tok_num_parts=arrays.tok_num_parts,
        tok_part_stride=arrays.tok_part_stride,
        config=merge_config,
    )


def _launch_triton_decode(q_nope, q_pe, ckv_cache, kpe_cache, scales, kv_format, kv_indices, arrays,
                          part_o, part_lse, out, lse, counters, sm_scale, causal, row_blocks, config):
    launch_decode(
        q_nope=q_nope,
        q_pe=q_pe,
        ckv_cache=ckv_cache,
        kpe_cache=kpe_cache,
        scales=part_lse.view(1, 1, -1) if scales is None else scales,  # never read when plain
        kv_format=kv_format,
        out=out,
        lse=lse,
        part_o=part_o,
        part_lse=part_lse,
        qo_indptr=arrays.qo_indptr,
        kv_indptr=arrays.kv_indptr,
        kv_indices=kv_indices,
        kv_len=arrays.kv_len,
        work_req=arrays.work_req,
        work_kv_begin=arrays.work_kv_begin,
        work_kv_end=arrays.work_kv_end,
        work_part_row=arrays.work_part_row,
        work_num_parts=arrays.work_num_parts,
        work_part_base=arrays.work_part_base,
        counters=counters,
        sm_scale=sm_scale,
        causal=causal,
        row_blocks=row_blocks,
        config=config,
    )


@torch.library.custom_op("openmla::paged_decode", mutates_args=("workspace", "counters", "out", "lse"))
def paged_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor | None,
    kv_scale: torch.Tensor | None,
    kv_format: int,
    kv_indices: torch.Tensor,
    meta: torch.Tensor,
    workspace: torch.Tensor,
    counters: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    sizes: list[int],
    sm_scale: float,
    causal: bool,
    launch: list[int],
) -> None:
    """``sizes = [batch, work_capacity, token_capacity, partial_rows, row_blocks, merge_kernel,
    backend]``; ``launch = [block_m, block_n, num_warps, num_stages, fixed_point_sum, kv_as_m]`` (the decode) followed by
    the merge kernel's ``[block_h, block_d, block_s, num_warps, num_stages]``."""
    batch, work_cap, tok_cap, rows, row_blocks, merge_kernel, backend = sizes
    part_o, part_lse = slice_workspace(workspace, rows, q_nope.shape[-1])
    ckv, kpe, scales = kv_views(kv_format, ckv_cache, kpe_cache, kv_scale)
    run_planned_decode(
        q_nope,
        q_pe,
        ckv,
        kpe,
        scales,
        kv_format,
        kv_indices,
        slice_meta(meta, batch, work_cap, tok_cap),
        part_o,
        part_lse,
        out,
        lse,
        counters,
        sm_scale,
        causal,
        row_blocks,
        DecodeConfig(*launch[:4], fixed_point_sum=bool(launch[4]), kv_as_m=bool(launch[5])),
        bool(merge_kernel),
        backend,
        ReduceConfig(*launch[6:]),
    )


@paged_decode.register_fake
def _(q_nope, q_pe, ckv_cache, kpe_cache, kv_scale, kv_format, kv_indices, meta, workspace, counters, out, lse, sizes,
      sm_scale, causal, launch) -> None:
    return None
