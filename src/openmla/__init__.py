"""openmla: fast Multi-head Latent Attention decode kernels (Triton over PyTorch).

Public surface:
    BatchMLAPagedAttentionWrapper  FlashInfer-style plan/run paged MLA decode.
    merge_states, ReduceMap        LSE-merge (reduce) of fp32 partial attention states.
    quantize_ds_mla, append_paged_kv_ds_mla, dequantize_ds_mla, append_paged_kv, DS_MLA_BYTES,
    FP8_MAX                        KV-cache write path: 656-byte FP8 rows, bf16 appends (openmla.fp8).
    reference                      the torch oracle (``openmla.reference.mla_decode_reference``).

Attributes load lazily, so importing ``openmla`` does not compile or import Triton kernels; set
``TRITON_INTERPRET=1`` before first use to run them on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "BatchMLAPagedAttentionWrapper": "openmla.wrapper",
    "merge_states": "openmla.merge",
    "ReduceMap": "openmla.merge",
    "ReduceConfig": "openmla.config",
    "DecodeConfig": "openmla.config",
    "quantize_ds_mla": "openmla.fp8",
    "dequantize_ds_mla": "openmla.fp8",
    "append_paged_kv_ds_mla": "openmla.fp8",
    "append_paged_kv": "openmla.fp8",
    "DS_MLA_BYTES": "openmla.fp8",
    "FP8_MAX": "openmla.fp8",
}

__all__ = [*_LAZY.keys(), "__version__"]  # noqa: PLE0604 - the names of the lazy table


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'openmla' has no attribute {name!r}")
