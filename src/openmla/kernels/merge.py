"""LSE-reduce (merge) of fp32 split partials into the final output.

Reduce map: query token ``t`` with ``n = tok_num_parts[t]`` pieces has the partials of piece
``j``, head ``h`` in row ``tok_part_row[t] + j * tok_part_stride[t] + h`` of ``part_o [R, D]`` /
``part_lse [R]``. ``tok_num_parts[t] == 0`` means nothing to merge (the decode wrote token ``t``
directly): the program writes nothing. The dense form (``DENSE``) needs no map: ``S`` pieces laid
out ``[S, T, H]``, so ``row = (j * T + t) * H + h``.

A program merges ``BLOCK_H`` heads x ``BLOCK_D`` columns of one token, ``BLOCK_S`` pieces per
step, with a running max (online softmax)::

    out = sum_j exp(lse_j - m) o_j / sum_j exp(lse_j - m),   lse = m + log(sum_j exp(lse_j - m))

Pieces with no tokens carry ``lse = -inf`` and weigh nothing (whatever their ``o`` holds); a row
with no finite piece gives ``out = 0``, ``lse = -inf``. LSE is natural-log on both sides.

``ORDERED`` (batch-invariant plans) takes the max over all pieces first, then adds the pieces one
at a time in piece order, weighted against that max: every output element is then the same
sequence of operations whatever the tiling, the step or the warps, so its bits depend on the
pieces alone and any config may be launched. The default form sums a step's pieces as a tree whose shape follows
the tile layout, and rescales at every step.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from openmla._interp import is_interpreting
from openmla.config import ReduceConfig
from openmla.kernels.launch import hooks_set, launch, run_recorded

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _merge_steps(part_o, part_lse, row0, stride, n_parts, o_h, m_h, o_d, o_s, b_m, b_l, b_acc,
                 D: tl.constexpr, BLOCK_S: tl.constexpr, NUM_STAGES: tl.constexpr):
    """The default merge: ``BLOCK_S`` pieces a step, summed as a tree, with a running max."""
    # Triton pipelines a loop without dots only when asked (tl.range): NUM_STAGES > 1 prefetches
    # the next pieces through cp.async while this step is summed.
    for s0 in tl.range(0, n_parts, BLOCK_S, num_stages=NUM_STAGES):
        m_sh = (s0 + o_s < n_parts)[:, None] & m_h[None, :]  # [BLOCK_S, BLOCK_H]
        # int32 rows and offsets: callers keep the partials under 2**31 floats
        i_prow = row0 + (s0 + o_s)[:, None] * stride + o_h[None, :]  # [BLOCK_S, BLOCK_H]
        b_lse_s = tl.load(part_lse + i_prow, mask=m_sh, other=float("-inf"))
        b_o = tl.load(part_o + i_prow[:, :, None] * D + o_d[None, None, :], mask=m_sh[:, :, None],
                      other=0.0, eviction_policy="evict_first")  # [BLOCK_S, BLOCK_H, BLOCK_D]
        b_m_new = tl.maximum(b_m, tl.max(b_lse_s, 0))  # [BLOCK_H]
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.math.exp2((b_m - b_m_safe) * LOG2E)
        b_w = tl.math.exp2((b_lse_s - b_m_safe[None, :]) * LOG2E)  # [BLOCK_S, BLOCK_H]
        # an empty piece's o is never read into the sum (0 * NaN would be NaN)
        b_wo = tl.where(b_w[:, :, None] > 0.0, b_w[:, :, None] * b_o, 0.0)
        b_l = b_l * b_alpha + tl.sum(b_w, 0)
        b_acc = b_acc * b_alpha[:, None] + tl.sum(b_wo, 0)  # [BLOCK_H, BLOCK_D]
        b_m = b_m_new
    return b_m, b_l, b_acc


@triton.jit
def _merge_in_order(part_o, part_lse, row0, stride, n_parts, num_heads, o_h, m_h, o_d, b_m, b_l, b_acc,
                    D: tl.constexpr, BLOCK_S: tl.constexpr, NUM_STAGES: tl.constexpr):
    """The ``ORDERED`` merge: the max over all pieces first (exact in any order, 32 pieces a
    step), then the pieces weighted against it and added one by one in piece order; ``BLOCK_S``
    pieces are unrolled a step (their loads issue together) and ``NUM_STAGES`` steps load ahead."""
    o_m = tl.arange(0, 32)
    for s0 in tl.range(0, n_parts, 32):
        m_sh = (s0 + o_m < n_parts)[:, None] & m_h[None, :]
        b_lse_s = tl.load(part_lse + row0 + (s0 + o_m)[:, None] * stride + o_h[None, :], mask=m_sh,
                          other=float("-inf"))  # [32, BLOCK_H]
        b_m = tl.maximum(b_m, tl.max(b_lse_s, 0))
    b_m_safe = tl.where(b_m == float("-inf"), 0.0, b_m)
    # Loads unmasked, at clamped piece and head indices: with a mask per unrolled piece, ptxas
    # issued the loads a few at a time between the sums (seen in SASS); unmasked they issue together.
    o_hc = tl.minimum(o_h, num_heads - 1)
    for s0 in tl.range(0, n_parts, BLOCK_S, num_stages=NUM_STAGES):
        for j in tl.static_range(BLOCK_S):
            i_row = row0 + tl.minimum(s0 + j, n_parts - 1) * stride + o_hc  # [BLOCK_H]
            b_lse = tl.load(part_lse + i_row)
            b_o = tl.load(part_o + i_row[:, None] * D + o_d[None, :], eviction_policy="evict_first")
            # a piece past the end weighs 0 (and x + 0 is x: the sum never holds -0)
            b_lse = tl.where(o_h * 0 + (s0 + j) < n_parts, b_lse, float("-inf"))
            b_w = tl.math.exp2((b_lse - b_m_safe) * LOG2E)  # [BLOCK_H]
            b_l = b_l + b_w
            b_acc = b_acc + tl.where(b_w[:, None] > 0.0, b_w[:, None] * b_o, 0.0)  # empty pieces' o unread
    return b_m, b_l, b_acc


@triton.jit
def _map_entry(tok_part_row, tok_num_parts, tok_part_stride, i_t):
    """Token ``i_t``'s reduce-map entry: its piece count, first partial row and piece stride."""
    return tl.load(tok_num_parts + i_t), tl.load(tok_part_row + i_t), tl.load(tok_part_stride + i_t)


# The token count, head count and piece count are not specialised on (divisibility by 16, == 1):
# addresses take their alignment from D, so one compiled kernel serves every shape of a config.
@triton.jit(do_not_specialize=["num_tokens", "num_heads", "dense_parts"])
def _merge_kernel(
    part_o,
    part_lse,
    out,
    lse,
    tok_part_row,
    tok_num_parts,
    tok_part_stride,
    num_tokens,
    num_heads,
    dense_parts,
    stride_o_t,
    stride_o_h,
    stride_lse_t,
    D: tl.constexpr,
    DENSE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    ORDERED: tl.constexpr,
    USE_PDL: tl.constexpr,
    MAP_EARLY: tl.constexpr,
):
    # Program order: column block fastest, then head block, then token, so neighbouring programs
    # read neighbouring bytes of each piece.
    num_db = D // BLOCK_D
    pid = tl.program_id(0)
    i_db = pid % num_db
    n_hb = tl.cdiv(num_heads, BLOCK_H)
    i_hb = (pid // num_db) % n_hb
    i_t = pid // num_db // n_hb
    if MAP_EARLY:  # the decode's plan wrote the map before the kernel waited on below ran: its
        # round trip overlaps the wait
        n_parts, row0, stride = _map_entry(tok_part_row, tok_num_parts, tok_part_stride, i_t)
    if USE_PDL:  # launched early (programmatic dependent launch): the previous kernel's writes
        tl.extra.cuda.gdc_wait()  # are visible after this; only a plan's map is read before it
        # Only now may the next PDL kernel start (to wait in turn): triggering before the wait lets
        # a chain of reduces park programs on the SMs kernels ahead (H100: small reduces 5-20%
        # slower, one config 1.75x).
        tl.extra.cuda.gdc_launch_dependents()
    if DENSE:
        n_parts = dense_parts
        row0 = i_t * num_heads
        stride = num_tokens * num_heads
    elif not MAP_EARLY:
        n_parts, row0, stride = _map_entry(tok_part_row, tok_num_parts, tok_part_stride, i_t)
    if n_parts == 0:
        return
    o_h = i_hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    m_h = o_h < num_heads
    o_d = i_db * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    o_s = tl.arange(0, BLOCK_S)

    b_m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_H], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    if ORDERED:
        b_m, b_l, b_acc = _merge_in_order(part_o, part_lse, row0, stride, n_parts, num_heads, o_h, m_h, o_d, b_m, b_l,
                                          b_acc, D, BLOCK_S, NUM_STAGES)
    else:
        b_m, b_l, b_acc = _merge_steps(part_o, part_lse, row0, stride, n_parts, o_h, m_h, o_d, o_s, b_m, b_l,
                                       b_acc, D, BLOCK_S, NUM_STAGES)

    m_seen = b_l > 0.0
    b_inv = 1.0 / tl.where(m_seen, b_l, 1.0)
    b_out = b_acc * b_inv[:, None]
    p_out = out + i_t.to(tl.int64) * stride_o_t + o_h[:, None] * stride_o_h + o_d[None, :]
    tl.store(p_out, b_out.to(out.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m_h[:, None])
    if i_db == 0:
        b_lse = tl.where(m_seen, b_m + tl.log(tl.where(m_seen, b_l, 1.0)), float("-inf"))
        tl.store(lse + i_t.to(tl.int64) * stride_lse_t + o_h, b_lse, mask=m_h)


@functools.cache
def _pdl_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Launch the reduce with programmatic dependent launch: on Hopper and later, unless
    ``OPENMLA_REDUCE_PDL=0``. Its programs then start while the previous kernel (the decode)
    drains and wait for it (``gdc_wait``) before their first load, so the launch latency hides
    behind the previous kernel's tail; results are the same either way."""
    if device.type != "cuda" or is_interpreting() or os.environ.get("OPENMLA_REDUCE_PDL", "1") == "0":
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())


def _merge_args(part_o, part_lse, out, lse, tok_arrays, num_tokens: int, dense_parts: int, s_out: tuple,
                s_lse: int) -> tuple:
    """The merge kernel's positional arguments (``s_out``, ``s_lse``: the strides of out, lse)."""
    return (part_o, part_lse, out, lse, *tok_arrays, num_tokens, out.shape[1], dense_parts, s_out[0], s_out[1],
            s_lse)


def _launch_args(part_o, part_lse, out, lse, tok_arrays, num_tokens: int, dense_parts: int,
                 config: ReduceConfig, pdl: bool, map_early: bool = False) -> tuple[int, tuple, dict]:
    """The merge kernel's grid size (0: nothing to launch), arguments and constexprs.
    ``map_early``: the reduce map is read before the PDL wait, for a map no kernel writes (a
    plan's); a caller's map may come from the kernel just before."""
    num_heads, d = out.shape[1], out.shape[2]
    block_d = min(config.block_d, d)
    # plain integer arithmetic: triton.cdiv and next_power_of_2 are JIT functions (~2 us a call)
    block_h = min(config.block_h, 1 << max(num_heads - 1, 0).bit_length())
    grid = num_tokens * -(-num_heads // block_h) * (d // block_d)
    args = _merge_args(part_o, part_lse, out, lse, tok_arrays, num_tokens, dense_parts, out.stride(), lse.stride(0))
    kwargs = dict(D=d, DENSE=dense_parts > 0, BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_S=config.block_s,
                  NUM_STAGES=config.num_stages, ORDERED=bool(config.ordered), USE_PDL=pdl,
                  MAP_EARLY=bool(map_early and pdl and not dense_parts),
                  num_warps=config.num_warps, num_stages=config.num_stages,
                  **({"launch_pdl": True} if pdl else {}))
    return grid, args, kwargs


def _launch(part_o, part_lse, out, lse, tok_arrays, num_tokens: int, dense_parts: int,
            config: ReduceConfig) -> None:
    grid, args, kwargs = _launch_args(part_o, part_lse, out, lse, tok_arrays, num_tokens, dense_parts, config,
                                      use_pdl(out.device))
    if grid:
        launch(_merge_kernel, (grid,), args, kwargs)


class PlannedMerge:
    """The decode's merge for one plan: partials, reduce map and config fixed, ``out`` and ``lse``
    given per call. Once launched, a call whose ``out``/``lse`` have the last call's dtype,
    16-byte alignment and strides launches the compiled kernel directly: the generic launch's key
    over every argument costs ~8 us of host time a call, and a decode step calls ``run()`` once
    per layer. PDL is decided here, once (``OPENMLA_REDUCE_PDL`` is read at plan time). The reduce
    map is the plan's (copied in before the decode runs), so it is read before the PDL wait."""

    def __init__(self, part_o: torch.Tensor, part_lse: torch.Tensor, tok_arrays: tuple, num_tokens: int,
                 config: ReduceConfig) -> None:
        self._part_o, self._part_lse, self._tok_arrays = part_o, part_lse, tok_arrays
        self._num_tokens, self._config = num_tokens, config
        self._pdl = use_pdl(part_o.device)
        self._device = part_o.get_device()
        self._direct = None  # (out/lse signature, recorded kernel, grid)

    def __call__(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        s_out, s_lse = out.stride(), lse.stride(0)
        sig = (out.dtype, out.shape, out.data_ptr() & 15, lse.data_ptr() & 15, s_out, s_lse)
        direct = self._direct
        if direct is not None and direct[0] == sig and not hooks_set():
            run_recorded(direct[1], direct[2], self._device,
                         _merge_args(self._part_o, self._part_lse, out, lse, self._tok_arrays, self._num_tokens, 0,
                                     s_out, s_lse))
            return
        grid, args, kwargs = _launch_args(self._part_o, self._part_lse, out, lse, self._tok_arrays, self._num_tokens,
                                          0, self._config, self._pdl, map_early=True)
        if grid:
            hit = launch(_merge_kernel, (grid,), args, kwargs)
            self._direct = None if hit is None else (sig, hit, (grid,))


def launch_merge(
    *,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    tok_part_row: torch.Tensor,
    tok_num_parts: torch.Tensor,
    tok_part_stride: torch.Tensor,
    config: ReduceConfig | None = None,
) -> None:
    """Merge partials laid out by a reduce map into ``out [T, H, D]`` / ``lse [T, H]`` (unit last
    strides); the int32 token arrays have one entry per token, ``tok_num_parts = 0`` to skip.

    Without ``config`` the decode's config is used: it depends on the head count, D and the GPU
    only, never on the batch, so deterministic plans stay bitwise batch-invariant."""
    if config is None:
        from openmla.tuning import decode_reduce_config  # the table is read on first use

        config = decode_reduce_config(out.shape[1], out.shape[2], out.device)
    _launch(part_o, part_lse, out, lse, (tok_part_row, tok_num_parts, tok_part_stride),
            tok_num_parts.numel(), 0, config)


def launch_merge_dense(
    *,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    num_parts: int,
    config: ReduceConfig,
) -> None:
    """Merge ``num_parts >= 1`` pieces laid out ``[S, T, H]`` (rows of ``part_o [S*T*H, D]``)."""
    # the map pointers are never read in the dense form; any int32 tensor will do
    _launch(part_o, part_lse, out, lse, (part_lse, part_lse, part_lse), out.shape[0], num_parts, config)
