"""Everything specific to Triton's CPU interpreter lives here.

The interpreter is selected by ``TRITON_INTERPRET=1`` *before* the kernel modules are
imported (Triton reads it when ``@triton.jit`` runs). The library never sets it itself;
the test suite's ``conftest.py`` and ``python -m openmla`` set it inline, before the kernels are
imported, when no GPU is present.

Known gap: under the interpreter ``tl.dot`` on bf16 operands multiplies raw bit patterns
(triton issue 11584). Kernels take a ``DOT_FP32`` compile-time flag that up-casts dot
operands to fp32; launchers pass :func:`dot_in_fp32` for it.
"""

from __future__ import annotations

import os

import torch

# Read once, when the kernel modules import this one: the moment Triton's ``@triton.jit`` reads
# it for our kernels too (and a launch then skips an environment lookup).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_interpreting() -> bool:
    return _INTERPRETING


def dot_in_fp32(device: torch.device) -> bool:
    """True when the kernels must up-cast dot operands (interpreter or CPU tensors)."""
    return is_interpreting() or device.type == "cpu"
