"""Reference oracle for paged MLA decode: plain torch, loops over requests and pages.

This module *is* the numeric specification (SPEC section 1); kernels are checked against it and
it is never edited to agree with a kernel. It runs anywhere torch runs, in float64 by default.

For request ``b`` with query tokens ``i < qo_len`` and heads ``h``, over its ``kv_len`` cached
tokens ``C[t] = [ckv[t] | kpe[t]]``::

    s[t] = sm_scale * (q_nope[i, h] . ckv[t] + q_pe[i, h] . kpe[t])
    out  = sum_t softmax(s)[t] * ckv[t]
    lse  = log(sum_t exp(s[t]))          # natural log

Causal masking is bottom-right aligned: query ``i`` sees keys ``t <= kv_len - qo_len + i``.
An empty request (or a query row that sees no key) gives ``out = 0`` and ``lse = -inf``.
"""

from __future__ import annotations

import torch


def gather_request_kv(
    cache: torch.Tensor, kv_indices: torch.Tensor, page_begin: int, kv_len: int, page_size: int
) -> torch.Tensor:
    """The ``kv_len`` tokens of one request, page by page: ``[kv_len, cache.shape[-1]]``."""
    rows = []
    num_pages = -(-kv_len // page_size)
    for p in range(num_pages):
        page = int(kv_indices[page_begin + p])
        take = min(page_size, kv_len - p * page_size)
        rows.append(cache[page, :take])
    if not rows:
        return cache.new_zeros((0, cache.shape[-1]))
    return torch.cat(rows, dim=0)


def mla_decode_reference(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_len: torch.Tensor,
    page_size: int,
    sm_scale: float,
    causal: bool,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA decode by definition.

    Args:
        q_nope: ``[num_qo_tokens, H, D_CKV]``.
        q_pe: ``[num_qo_tokens, H, D_KPE]``.
        ckv_cache: ``[num_pages, page_size, D_CKV]``.
        kpe_cache: ``[num_pages, page_size, D_KPE]``.
        qo_indptr: ``[B + 1]`` query-token offsets of each request.
        kv_indptr: ``[B + 1]`` offsets of each request's pages in ``kv_indices``.
        kv_indices: page ids.
        kv_len: ``[B]`` tokens per request.
        compute_dtype: every product and sum is done in this dtype (float64 by default).

    The arithmetic runs on the device of ``q_nope`` (CPU in the tests); index arrays are read on
    the host.

    Returns:
        ``(out, lse)``: ``out`` ``[num_qo_tokens, H, D_CKV]`` and ``lse`` ``[num_qo_tokens, H]``
        (natural log), both in ``compute_dtype``; empty rows give ``out = 0``, ``lse = -inf``.
    """
    num_tokens, num_heads, d_ckv = q_nope.shape
    dev = q_nope.device
    out = torch.zeros((num_tokens, num_heads, d_ckv), dtype=compute_dtype, device=dev)
    lse = torch.full((num_tokens, num_heads), float("-inf"), dtype=compute_dtype, device=dev)
    qo_indptr, kv_indptr, kv_indices, kv_len = (
        t.cpu() for t in (qo_indptr, kv_indptr, kv_indices, kv_len)
    )
    for b in range(kv_len.numel()):
        q_begin, q_end = int(qo_indptr[b]), int(qo_indptr[b + 1])
        qo_len, n = q_end - q_begin, int(kv_len[b])
        if qo_len == 0 or n == 0:
            continue
        ckv = gather_request_kv(ckv_cache, kv_indices, int(kv_indptr[b]), n, page_size)
        kpe = gather_request_kv(kpe_cache, kv_indices, int(kv_indptr[b]), n, page_size)
        ckv, kpe = ckv.to(compute_dtype), kpe.to(compute_dtype)
        qn = q_nope[q_begin:q_end].to(compute_dtype)  # [qo_len, H, D_CKV]
        qp = q_pe[q_begin:q_end].to(compute_dtype)
        s = (qn @ ckv.T + qp @ kpe.T) * sm_scale  # [qo_len, H, n]
        if causal:
            last_visible = torch.arange(qo_len, device=dev) + (n - qo_len)  # [qo_len]
            hidden = torch.arange(n, device=dev)[None, :] > last_visible[:, None]  # [qo_len, n]
            s = s.masked_fill(hidden[:, None, :], float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # [qo_len, H]
        seen = torch.isfinite(row_lse)
        p = torch.exp(s - torch.where(seen, row_lse, 0)[..., None])
        o = p @ ckv
        out[q_begin:q_end] = torch.where(seen[..., None], o, 0)
        lse[q_begin:q_end] = row_lse
    return out, lse


# --- FP8 "DeepSeek V3.2 3-buffer" rows (656 bytes a token; see openmla.fp8) -------------------

DS_MLA_BYTES = 656
_FP8_MAX = 448.0
_FLT_MIN = 2.0**-126


def dequantize_ds_mla_reference(kv_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 rows ``uint8 [..., 656]`` to ``(ckv [..., 512], kpe [..., 64])`` in float32, by
    reinterpreting the bytes: codes ``[0, 512)`` as float8 e4m3fn, four float32 scales at
    ``[512, 528)`` (scale j for channels ``[128 j, 128 j + 128)``), bf16 rope at ``[528, 656)``."""
    lead = kv_u8.shape[:-1]
    rows = kv_u8.reshape(-1, DS_MLA_BYTES)
    codes = rows[:, :512].contiguous().view(torch.float8_e4m3fn).float()  # [M, 512]
    scales = rows[:, 512:528].contiguous().view(torch.float32)  # [M, 4]
    kpe = rows[:, 528:].contiguous().view(torch.bfloat16).float()  # [M, 64]
    ckv = (codes.view(-1, 4, 128) * scales[:, :, None]).view(-1, 512)
    return ckv.view(*lead, 512), kpe.view(*lead, 64)


def quantize_ds_mla_reference(
    ckv: torch.Tensor, kpe: torch.Tensor, pow2_scale: bool = False
) -> torch.Tensor:
    """Tokens ``ckv [N, 512]`` / ``kpe [N, 64]`` to FP8 rows ``uint8 [N, 656]``, by definition:
    per 128-channel group ``scale = max(amax / 448, 2**-126)`` in float32 (rounded up to a power of
    two with ``pow2_scale``), codes ``= fp8_e4m3fn(clamp(ckv / scale, -448, 448))`` (torch's
    round-to-nearest-even conversion), rope rounded to bf16."""
    n = ckv.shape[0]
    x = ckv.float().view(n, 4, 128)
    # Quotients of float32 values are formed in float64 and rounded once to float32: that equals
    # the correctly rounded float32 quotient (53 >= 2 * 24 + 2 bits, so the double rounding is
    # innocuous) on every device. A float32 division in torch is not: on CUDA, dividing by a
    # Python scalar multiplies by its rounded reciprocal.
    amax = x.abs().amax(dim=-1)  # [N, 4]
    scale = torch.clamp((amax.double() / _FP8_MAX).float(), min=_FLT_MIN)
    if pow2_scale:
        mant, expo = torch.frexp(scale)  # scale = mant * 2**expo, mant in [0.5, 1)
        scale = torch.where(mant == 0.5, scale, torch.ldexp(torch.ones_like(scale), expo))
    y = (x.double() / scale.double()[:, :, None]).float()
    y = torch.clamp(y, -_FP8_MAX, _FP8_MAX)
    codes = y.to(torch.float8_e4m3fn).view(torch.uint8).view(n, 512)
    scale_bytes = scale.contiguous().view(torch.uint8).view(n, 16)
    kpe_bytes = kpe.to(torch.bfloat16).contiguous().view(torch.uint8).view(n, 128)
    return torch.cat([codes, scale_bytes, kpe_bytes], dim=1)
