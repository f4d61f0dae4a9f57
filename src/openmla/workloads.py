"""Benchmark workloads (``WORKLOADS.md``), their byte/FLOP counting, and a fast on-device batch
builder. Shared by ``python -m openmla`` and ``benchmarks/``.

Counting (per WORKLOADS.md):
    bytes = total_kv * bytes_per_token + B * Sq * Hq * (576 * q_bytes + 512 * out_bytes)
    FLOPs = 2 * Sq * total_kv * Hq * (576 + 512)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

D_CKV, D_KPE = 512, 64


@dataclass(frozen=True)
class Workload:
    name: str
    what: str
    batch: int
    qo_len: int
    kv_lens: tuple[int, ...]
    num_heads: int
    page_size: int = 64
    kv_format: str = "bf16"  # "bf16" or "ds_mla" (DeepSeek V3.2 656-byte fp8 rows)

    @property
    def causal(self) -> bool:
        return self.qo_len > 1

    @property
    def total_kv(self) -> int:
        return sum(self.kv_lens)

    @property
    def kv_bytes_per_token(self) -> int:
        return {"bf16": 1152, "ds_mla": 656}[self.kv_format]

    def bytes(self, q_bytes: int = 2, out_bytes: int = 2) -> int:
        io = self.batch * self.qo_len * self.num_heads * (576 * q_bytes + 512 * out_bytes)
        return self.total_kv * self.kv_bytes_per_token + io

    def flops(self) -> int:
        return 2 * self.qo_len * self.total_kv * self.num_heads * (D_CKV + D_KPE + D_CKV)


def _uniform(name: str, what: str, batch: int, qo_len: int, kv: int, heads: int,
             kv_format: str = "bf16") -> Workload:
    return Workload(name, what, batch, qo_len, (kv,) * batch, heads, kv_format=kv_format)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        _uniform("W1", "DeepSeek-V3 decode, TP8", 64, 1, 4096, 16),
        _uniform("W2", "DeepSeek-V3 decode, 128 heads", 64, 1, 4096, 128),
        _uniform("W3", "large batch, 128 heads", 128, 1, 8192, 128),
        _uniform("W4", "long context, low batch", 8, 1, 65536, 16),
        _uniform("W5", "MTP decode, causal", 64, 2, 4096, 16),
        _uniform("W6", "4 heads (TP8 of 32)", 128, 1, 4096, 4),
        Workload("W7", "skewed: 128K among 31 x 1K", 32, 1, (131072,) + (1024,) * 31, 16),
        # W1 with more heads: the memory-bound issue holds >= 0.9x fa3 here
        _uniform("W1h32", "W1 with 32 heads", 64, 1, 4096, 32),
        _uniform("W1h64", "W1 with 64 heads", 64, 1, 4096, 64),
        _uniform("W8", "DeepSeek V3.2 fp8 3-buffer cache", 64, 1, 8192, 16, "ds_mla"),
        _uniform("W9", "V3.2 fp8 3-buffer, 128 heads, MTP", 64, 2, 8192, 128, "ds_mla"),
        # W8 / W9 shapes over a bf16 cache: the fp8 speed-up, and the peer's fastest option
        _uniform("W8-bf16", "W8 shape, bf16 cache", 64, 1, 8192, 16),
        _uniform("W9-bf16", "W9 shape, bf16 cache", 64, 2, 8192, 128),
    )
}


@dataclass
class DeviceBatch:
    """A random paged batch on a device, with ``rotations`` disjoint page tables over one cache so
    timing loops can step through them and never find the KV in L2."""

    workload: Workload
    q_nope: torch.Tensor
    q_pe: torch.Tensor
    ckv_cache: torch.Tensor
    kpe_cache: torch.Tensor
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_len: torch.Tensor
    kv_indices: list[torch.Tensor]  # one shuffled page table per rotation
    sm_scale: float
    kv_cache: torch.Tensor | None = None  # ds_mla: uint8 [P, page, 656], quantised from the bf16 cache


def make_device_batch(
    w: Workload, device: torch.device | str, *, dtype: torch.dtype = torch.bfloat16,
    rotations: int = 1, seed: int = 0,
) -> DeviceBatch:
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    pages = [-(-n // w.page_size) for n in w.kv_lens]
    per_rot = sum(pages)
    num_pages = per_rot * rotations
    cache = torch.randn((num_pages, w.page_size, D_CKV + D_KPE), generator=g, device=dev, dtype=dtype)
    perm = torch.randperm(num_pages, generator=g, device=dev).to(torch.int32)
    kv_indptr = [0]
    for p in pages:
        kv_indptr.append(kv_indptr[-1] + p)
    tokens = w.batch * w.qo_len
    q = torch.randn((tokens, w.num_heads, D_CKV + D_KPE), generator=g, device=dev, dtype=dtype)

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=dev)

    kv_cache = None
    if w.kv_format == "ds_mla":
        from openmla.fp8 import quantize_ds_mla

        kv_cache = quantize_ds_mla(cache[..., :D_CKV].reshape(-1, D_CKV),
                                   cache[..., D_CKV:].reshape(-1, D_KPE)).view(num_pages, w.page_size, -1)
    return DeviceBatch(
        workload=w,
        kv_cache=kv_cache,
        q_nope=q[..., :D_CKV].contiguous(),
        q_pe=q[..., D_CKV:].contiguous(),
        ckv_cache=cache[..., :D_CKV].contiguous(),
        kpe_cache=cache[..., D_CKV:].contiguous(),
        qo_indptr=i32(list(range(0, tokens + 1, w.qo_len))),
        kv_indptr=i32(kv_indptr),
        kv_len=i32(list(w.kv_lens)),
        kv_indices=[perm[r * per_rot:(r + 1) * per_rot].contiguous() for r in range(rotations)],
        sm_scale=1.0 / (D_CKV + D_KPE) ** 0.5,
    )


def plan_args(b: DeviceBatch, rotation: int = 0, *, bf16_cache: bool = False) -> tuple:
    """Positional ``plan()`` arguments, the same for openmla and FlashInfer (``bf16_cache``: plan
    the 16-bit cache of an fp8 workload)."""
    w = b.workload
    kv_dtype = torch.uint8 if b.kv_cache is not None and not bf16_cache else b.ckv_cache.dtype
    return (b.qo_indptr, b.kv_indptr, b.kv_indices[rotation], b.kv_len, w.num_heads, D_CKV, D_KPE,
            w.page_size, w.causal, b.sm_scale, b.q_nope.dtype, kv_dtype)
