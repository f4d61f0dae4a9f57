"""KV-cache write path (public): FP8 "DeepSeek V3.2 3-buffer" rows and bf16 paged appends.

A token's FP8 row is 656 bytes, byte-compatible with FlashMLA / vLLM ``fp8_ds_mla``:

    bytes [  0, 512)  latent ``ckv`` (512 channels) as float8 e4m3fn (max 448)
    bytes [512, 528)  four float32 scales (little endian); scale j covers channels [128 j, 128 j + 128)
    bytes [528, 656)  rope ``kpe`` (64 values) in bf16

and ``ckv[c] = fp8[c] * scale[c // 128]``. A paged FP8 cache is ``uint8 [num_pages, page_size,
656]``. Quantisation, per 128-channel group: ``scale = max(amax / 448, 2**-126)`` (fp32; the floor,
vLLM's, makes an all-zero group store scale 2**-126 and zero codes, which dequantise to exact
zeros); ``pow2_scale=True`` rounds the scale up to a power of two; codes are ``ckv / scale``
rounded to nearest even, saturated to +-448. Inputs must be finite.

Round trip (``dequantize_ds_mla(quantize_ds_mla(x))`` in float32), per element with ``s`` its
group's stored scale: ``|x - deq| <= max(2**-4 |x|, 2**-10 s) + 2**-22 (|x| + s)``. The first
term is half an e4m3 ulp (3 mantissa bits: relative 2**-4 in the normal range, absolute
``2**-10 s`` among the subnormals, step ``2**-9 s``); the second covers the float32 division and
product. ``s`` is ``amax / 448`` (below ``amax / 224`` with ``pow2_scale``), or the floor.

Slots: token ``i`` is written to slot ``slots[i] = page * page_size + offset``; negative slots
are padding and write nothing; slots at or past ``num_pages * page_size`` are skipped too (never
checked on the host, which would cost a device sync). Duplicate slots race.
"""

from __future__ import annotations

import torch

from openmla.kernels.quantize import (
    D_CKV,
    D_KPE,
    ROW_BYTES,
    launch_append_kv,
    launch_dequantize_ds_mla,
    launch_quantize_ds_mla,
)
from openmla.validation import ATTN_DTYPES, INDEX_DTYPES, check_shape, check_tensor, check_unit_last_stride

DS_MLA_BYTES = ROW_BYTES  # 656
FP8_MAX = 448.0

__all__ = [
    "DS_MLA_BYTES",
    "FP8_MAX",
    "append_paged_kv",
    "append_paged_kv_ds_mla",
    "dequantize_ds_mla",
    "quantize_ds_mla",
]


def _check_tokens(ckv: object, kpe: object) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("ckv", ckv, dtypes=ATTN_DTYPES, ndim=2)
    n = ckv.shape[0]
    check_shape("ckv", ckv, (n, D_CKV))
    check_tensor("kpe", kpe, dtypes=(ckv.dtype,), ndim=2, device=ckv.device)
    check_shape("kpe", kpe, (n, D_KPE))
    check_unit_last_stride("ckv", ckv)
    check_unit_last_stride("kpe", kpe)
    return ckv, kpe


def _check_slots(slots: object, n: int, device: torch.device) -> torch.Tensor:
    check_tensor("slots", slots, dtypes=INDEX_DTYPES, ndim=1, device=device)
    check_shape("slots", slots, (n,))
    return slots.contiguous()


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def quantize_ds_mla(ckv: torch.Tensor, kpe: torch.Tensor, *, pow2_scale: bool = False) -> torch.Tensor:
    """Quantise tokens into fresh 656-byte FP8 rows.

    Args:
        ckv: ``[N, 512]`` bf16 or fp16 latent (unit last stride).
        kpe: ``[N, 64]`` rope, same dtype (fp16 is rounded to bf16 in the row).
        pow2_scale: round each scale up to a power of two.

    Returns:
        ``uint8 [N, 656]``.
    """
    ckv, kpe = _check_tokens(ckv, kpe)
    _check_bool("pow2_scale", pow2_scale)
    out = torch.empty((ckv.shape[0], 1, DS_MLA_BYTES), dtype=torch.uint8, device=ckv.device)
    launch_quantize_ds_mla(ckv=ckv, kpe=kpe, slots=None, cache=out, pow2_scale=pow2_scale)
    return out.view(ckv.shape[0], DS_MLA_BYTES)


def append_paged_kv_ds_mla(
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    slots: torch.Tensor,
    kv_cache: torch.Tensor,
    *,
    pow2_scale: bool = False,
) -> None:
    """Quantise tokens straight into a paged FP8 cache.

    Args:
        ckv: ``[N, 512]`` bf16 or fp16; kpe: ``[N, 64]`` same dtype.
        slots: ``[N]`` int32/int64, ``page * page_size + offset``; negative = skip the token.
        kv_cache: ``uint8 [num_pages, page_size, 656]``, unit last stride, page and token strides
            multiples of 4 bytes (any contiguous cache qualifies). Written in place: only the rows
            at the given slots change.
        pow2_scale: round each scale up to a power of two.
    """
    ckv, kpe = _check_tokens(ckv, kpe)
    slots = _check_slots(slots, ckv.shape[0], ckv.device)
    _check_ds_mla_cache("kv_cache", kv_cache, ckv.device)
    _check_bool("pow2_scale", pow2_scale)
    launch_quantize_ds_mla(ckv=ckv, kpe=kpe, slots=slots, cache=kv_cache, pow2_scale=pow2_scale)


def append_paged_kv(
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    slots: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
) -> None:
    """Copy tokens into the 16-bit paged layout (the decode's ``ckv_cache`` / ``kpe_cache``).

    Args:
        ckv: ``[N, 512]``; kpe: ``[N, 64]``; both the caches' dtype (bf16 or fp16).
        slots: ``[N]`` int32/int64, ``page * page_size + offset``; negative = skip the token.
        ckv_cache: ``[num_pages, page_size, 512]``; kpe_cache: ``[num_pages, page_size, 64]``
            (separate tensors or views of one ``[num_pages, page_size, 576]`` buffer), unit last
            strides. Written in place: only the rows at the given slots change.
    """
    check_tensor("ckv_cache", ckv_cache, dtypes=ATTN_DTYPES, ndim=3)
    num_pages, page_size, d_ckv = ckv_cache.shape
    if d_ckv != D_CKV:
        raise ValueError(f"ckv_cache's last dimension must be {D_CKV}, got shape {tuple(ckv_cache.shape)}")
    dev = ckv_cache.device
    check_tensor("kpe_cache", kpe_cache, dtypes=(ckv_cache.dtype,), ndim=3, device=dev)
    check_shape("kpe_cache", kpe_cache, (num_pages, page_size, D_KPE))
    check_unit_last_stride("ckv_cache", ckv_cache)
    check_unit_last_stride("kpe_cache", kpe_cache)
    check_tensor("ckv", ckv, dtypes=(ckv_cache.dtype,), device=dev)
    ckv, kpe = _check_tokens(ckv, kpe)
    slots = _check_slots(slots, ckv.shape[0], dev)
    launch_append_kv(ckv=ckv, kpe=kpe, slots=slots, ckv_cache=ckv_cache, kpe_cache=kpe_cache)


def dequantize_ds_mla(
    kv: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantise 656-byte FP8 rows (tests, debugging).

    Args:
        kv: ``uint8 [..., 656]`` (any leading shape, e.g. a whole paged cache).
        dtype: torch.bfloat16 (ckv rounded to nearest even) or torch.float32 (exact).

    Returns:
        ``(ckv [..., 512], kpe [..., 64])`` in ``dtype``.
    """
    check_tensor("kv", kv, dtypes=(torch.uint8,))
    if kv.dim() < 1 or kv.shape[-1] != DS_MLA_BYTES:
        raise ValueError(f"kv's last dimension must be {DS_MLA_BYTES}, got shape {tuple(kv.shape)}")
    if dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    lead = tuple(kv.shape[:-1])
    rows = kv.reshape(-1, DS_MLA_BYTES).contiguous()
    if rows.storage_offset() % 4:  # the kernel reads the scales through a float32 view
        rows = rows.clone()
    ckv = torch.empty((rows.shape[0], D_CKV), dtype=dtype, device=kv.device)
    kpe = torch.empty((rows.shape[0], D_KPE), dtype=dtype, device=kv.device)
    launch_dequantize_ds_mla(kv=rows, ckv_out=ckv, kpe_out=kpe)
    return ckv.view(*lead, D_CKV), kpe.view(*lead, D_KPE)


def _check_ds_mla_cache(name: str, cache: object, device: torch.device) -> None:
    check_tensor(name, cache, dtypes=(torch.uint8,), ndim=3, device=device)
    if cache.shape[-1] != DS_MLA_BYTES:
        raise ValueError(f"{name}'s last dimension must be {DS_MLA_BYTES}, got shape {tuple(cache.shape)}")
    check_unit_last_stride(name, cache)
    if cache.stride(0) % 4 or cache.stride(1) % 4 or cache.storage_offset() % 4:
        raise ValueError(
            f"{name} must have page and token strides and a storage offset that are multiples of 4 "
            f"bytes, got strides {cache.stride()} and offset {cache.storage_offset()}"
        )
