"""Public LSE-merge of partial attention states (the standalone LSE-reduce kernel)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openmla.config import ReduceConfig
from openmla.kernels.merge import launch_merge, launch_merge_dense
from openmla.tuning import reduce_config
from openmla.validation import ATTN_DTYPES, check_int, check_shape, check_tensor, check_unit_last_stride


@dataclass(frozen=True)
class ReduceMap:
    """Where each query token's partials lie in flat ``[R, D]`` / ``[R]`` partials (the decode's
    layout): piece ``j`` of token ``t``, head ``h`` is row
    ``part_row[t] + j * part_stride[t] + h``, for ``j < num_parts[t]``.

    ``part_row``, ``num_parts``, ``part_stride``: int32 ``[T]`` on the partials' device;
    ``num_parts[t] = 0`` leaves token ``t``'s ``out``/``lse`` rows as they are. The values are
    not checked (that would synchronise): rows must lie inside the partials.
    ``num_heads``: H. ``max_parts``: a host-side estimate of the largest ``num_parts``, used only
    to pick the launch config."""

    part_row: torch.Tensor
    num_parts: torch.Tensor
    part_stride: torch.Tensor
    num_heads: int
    max_parts: int = 32


def merge_states(
    partial_out: torch.Tensor,
    partial_lse: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    *,
    reduce_map: ReduceMap | None = None,
    config: ReduceConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention states computed over disjoint parts of the same keys.

    Args:
        partial_out: float32, contiguous: ``[S, T, H, D]`` each part's normalised output, or with
            ``reduce_map`` the flat ``[R, D]`` rows the map points into.
        partial_lse: float32: ``[S, T, H]`` each part's natural-log LSE (``-inf`` for a part
            that saw no key; such parts weigh nothing), or ``[R]`` with ``reduce_map``.
        out_dtype: torch.bfloat16 or torch.float16, the dtype of ``out`` when it is allocated.
        out / lse: optional ``[T, H, D]`` (out_dtype) and ``[T, H]`` float32 destinations.
        reduce_map: a :class:`ReduceMap` (partials laid out as the decode lays them out).
        config: a launch config; default: the GPU's tuning table (see ``openmla.tuning``).

    Returns:
        ``(out, lse)`` with ``out = sum_s exp(lse_s) o_s / sum_s exp(lse_s)`` and
        ``lse = log(sum_s exp(lse_s))``; rows where every part is empty give 0 and ``-inf``.
        With ``reduce_map``, tokens with ``num_parts = 0`` are not written (zeros and ``-inf``
        when ``out``/``lse`` are allocated here).
    """
    if config is not None and not isinstance(config, ReduceConfig):
        raise TypeError(f"config must be an openmla.config.ReduceConfig, got {type(config).__name__}")
    if reduce_map is None:
        check_tensor("partial_out", partial_out, dtypes=(torch.float32,), ndim=4)
        num_parts, num_tokens, num_heads, d = partial_out.shape
        check_tensor("partial_lse", partial_lse, dtypes=(torch.float32,), ndim=3, device=partial_out.device)
        check_shape("partial_lse", partial_lse, (num_parts, num_tokens, num_heads))
        if num_parts < 1:
            raise ValueError(f"partial_out must hold at least one part, got shape {tuple(partial_out.shape)}")
    else:
        num_tokens, num_heads, num_parts = _check_reduce_map(reduce_map, partial_out, partial_lse)
        d = partial_out.shape[1]
    if out_dtype not in ATTN_DTYPES:
        raise TypeError(f"out_dtype must be torch.bfloat16 or torch.float16, got {out_dtype}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"partial_out's last dimension must be a power of two >= 16, got {d}")
    if partial_out.numel() >= 2**31:
        raise ValueError(f"partial_out must hold fewer than 2**31 elements, got shape {tuple(partial_out.shape)}")
    dev = partial_out.device
    fill = reduce_map is not None  # skipped tokens must not read as garbage
    if out is None:
        new = torch.zeros if fill else torch.empty
        out = new((num_tokens, num_heads, d), dtype=out_dtype, device=dev)
    else:
        check_tensor("out", out, dtypes=ATTN_DTYPES, device=dev)
        check_shape("out", out, (num_tokens, num_heads, d))
        check_unit_last_stride("out", out)
    if lse is None:
        lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=dev)
        if fill:
            lse.fill_(float("-inf"))
    else:
        check_tensor("lse", lse, dtypes=(torch.float32,), device=dev)
        check_shape("lse", lse, (num_tokens, num_heads))
        check_unit_last_stride("lse", lse)
    if config is None:
        config = reduce_config(num_tokens, num_heads, d, num_parts, dev)
    part_o = partial_out.contiguous().view(-1, d)
    part_lse = partial_lse.contiguous().view(-1)
    if reduce_map is None:
        launch_merge_dense(part_o=part_o, part_lse=part_lse, out=out, lse=lse, num_parts=num_parts,
                           config=config)
    else:
        launch_merge(part_o=part_o, part_lse=part_lse, out=out, lse=lse, tok_part_row=reduce_map.part_row,
                     tok_num_parts=reduce_map.num_parts, tok_part_stride=reduce_map.part_stride,
                     config=config)
    return out, lse


def _check_reduce_map(m: ReduceMap, partial_out: torch.Tensor, partial_lse: torch.Tensor,
                      ) -> tuple[int, int, int]:
    """``(T, H, max_parts)`` of a valid map; raises naming the offending argument."""
    if not isinstance(m, ReduceMap):
        raise TypeError(f"reduce_map must be an openmla.ReduceMap, got {type(m).__name__}")
    check_tensor("partial_out", partial_out, dtypes=(torch.float32,), ndim=2)
    dev = partial_out.device
    check_tensor("partial_lse", partial_lse, dtypes=(torch.float32,), ndim=1, device=dev)
    check_shape("partial_lse", partial_lse, (partial_out.shape[0],))
    num_tokens = None
    for name in ("part_row", "num_parts", "part_stride"):
        t = check_tensor(f"reduce_map.{name}", getattr(m, name), dtypes=(torch.int32,), ndim=1, device=dev)
        num_tokens = t.numel() if num_tokens is None else num_tokens
        check_shape(f"reduce_map.{name}", t, (num_tokens,))
        if not t.is_contiguous():
            raise ValueError(f"reduce_map.{name} must be contiguous, got stride {t.stride()}")
    check_int("reduce_map.num_heads", m.num_heads, low=1)
    check_int("reduce_map.max_parts", m.max_parts, low=1)
    return num_tokens, m.num_heads, m.max_parts
