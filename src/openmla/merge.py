"""Public LSE-merge of partial attention states (the split-KV merge kernel, standalone)."""

from __future__ import annotations

import torch

from openmla.kernels.merge import launch_merge
from openmla.validation import ATTN_DTYPES, check_shape, check_tensor, check_unit_last_stride


def merge_states(
    partial_out: torch.Tensor,
    partial_lse: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``S`` attention states computed over disjoint parts of the same keys.

    Args:
        partial_out: ``[S, T, H, D]`` float32, contiguous: each part's normalised output.
        partial_lse: ``[S, T, H]`` float32: each part's natural-log LSE (``-inf`` for a part
            that saw no key; such parts weigh nothing).
        out_dtype: torch.bfloat16 or torch.float16, the dtype of ``out`` when it is allocated.
        out / lse: optional ``[T, H, D]`` (out_dtype) and ``[T, H]`` float32 destinations.

    Returns:
        ``(out, lse)`` with ``out = sum_s exp(lse_s) o_s / sum_s exp(lse_s)`` and
        ``lse = log(sum_s exp(lse_s))``; rows where every part is empty give 0 and ``-inf``.
    """
    check_tensor("partial_out", partial_out, dtypes=(torch.float32,), ndim=4)
    num_parts, num_tokens, num_heads, d = partial_out.shape
    check_tensor("partial_lse", partial_lse, dtypes=(torch.float32,), ndim=3,
                 device=partial_out.device)
    check_shape("partial_lse", partial_lse, (num_parts, num_tokens, num_heads))
    if out_dtype not in ATTN_DTYPES:
        raise TypeError(f"out_dtype must be torch.bfloat16 or torch.float16, got {out_dtype}")
    if num_parts < 1:
        raise ValueError(f"partial_out must hold at least one part, got shape {tuple(partial_out.shape)}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"partial_out's last dimension must be a power of two >= 16, got {d}")
    dev = partial_out.device
    if out is None:
        out = torch.empty((num_tokens, num_heads, d), dtype=out_dtype, device=dev)
    else:
        check_tensor("out", out, dtypes=ATTN_DTYPES, device=dev)
        check_shape("out", out, (num_tokens, num_heads, d))
        check_unit_last_stride("out", out)
    if lse is None:
        lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=dev)
    else:
        check_tensor("lse", lse, dtypes=(torch.float32,), device=dev)
        check_shape("lse", lse, (num_tokens, num_heads))
        check_unit_last_stride("lse", lse)
    if num_parts * num_tokens * num_heads * d >= 2**31:
        raise ValueError(f"partial_out must hold fewer than 2**31 elements, got shape {tuple(partial_out.shape)}")
    # Token t, head h, part s sits in row (s * T + t) * H + h of the flattened partials.
    def i32(value: int) -> torch.Tensor:
        return torch.full((num_tokens,), value, dtype=torch.int32, device=dev)

    launch_merge(
        part_o=partial_out.contiguous().view(-1, d),
        part_lse=partial_lse.contiguous().view(-1),
        out=out,
        lse=lse,
        tok_part_row=torch.arange(0, num_tokens * num_heads, num_heads, dtype=torch.int32, device=dev),
        tok_num_parts=i32(num_parts),
        tok_part_stride=i32(num_tokens * num_heads),
    )
    return out, lse
