"""Compile the decode kernel for Hopper (sm_90) without a GPU and report what the compiler made
of it: shared memory, cp.async copies, mma.sync vs wgmma instructions, layout conversions.

    python benchmarks/compile_check.py [--block-n 32] [--stages 3] [--block-m 16] [--warps 4]
                                       [--kv-format 0|1|2] [--gather] [--plain-cvt] [--fixed-point-sum]

Writes the TTGIR and PTX to --out (default /tmp). Uses the installed triton's own compiler, so
the answer is for that version (the GPU machine has triton 3.6; check there for its answer).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from openmla.kernels.decode import PAGE_WINDOW, _mla_decode_kernel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block-n", type=int, default=32)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--block-m", type=int, default=16)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--fixed-point-sum", action="store_true", help="batch-invariant mode's row sums")
    p.add_argument("--kv-format", type=int, default=0, help="0 bf16, 1 fp8 per-tensor, 2 656-byte rows")
    p.add_argument("--gather", action="store_true", help="page size not a multiple of BLOCK_N")
    p.add_argument("--plain-cvt", action="store_true", help="Triton's fp8 casts, not the PTX dequantisation")
    p.add_argument("--out", default="/tmp")
    a = p.parse_args()
    fn = _mla_decode_kernel
    const = {"H": 16, "D_CKV": 512, "D_KPE": 64, "PAGE_SIZE": 64, "BLOCK_M": a.block_m,
             "BLOCK_N": a.block_n, "FIXED_POINT_SUM": a.fixed_point_sum, "IS_CAUSAL": False, "ONE_PAGE_PER_BLOCK": not a.gather,
             "PAGE_WINDOW": PAGE_WINDOW, "DOT_FP32": False, "KV_FORMAT": a.kv_format,
             "ASM_CVT": bool(a.kv_format) and not a.plain_cvt}  # what launch_decode picks on sm_90
    ptrs = {"q_nope": "*bf16", "q_pe": "*bf16", "ckv": "*bf16", "kpe": "*bf16", "out": "*bf16",
            "lse": "*fp32", "part_o": "*fp32", "part_lse": "*fp32", "scales": "*fp32"}
    if a.kv_format:
        ptrs["ckv"] = "*fp8e4nv"
    if a.kv_format == 1:
        ptrs["kpe"] = "*fp8e4nv"
    sig = {}
    for n in fn.arg_names:
        if n in const:
            sig[n] = "constexpr"
        elif n in ptrs:
            sig[n] = ptrs[n]
        elif n == "scale_log2":
            sig[n] = "fp32"
        elif n.startswith("stride") or n == "ROW_BLOCKS":
            sig[n] = "i32"
        else:
            sig[n] = "*i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or n.startswith("stride")}
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": a.warps, "num_stages": a.stages})
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.out, "decode.ttgir").write_text(ttgir)
    Path(a.out, "decode.ptx").write_text(ptx)
    print(f"triton {triton.__version__}: shared {k.metadata.shared} B, "
          f"cp.async {ptx.count('cp.async.cg')}, ld.global {ptx.count('ld.global')}, "
          f"mma.sync {ptx.count('mma.sync')}, wgmma {ptx.count('wgmma.mma_async')}, "
          f"cvt {len(re.findall('cvt', ptx))}, ld/st.shared {ptx.count('ld.shared')}/{ptx.count('st.shared')}, "
          f"bar.sync {ptx.count('bar.sync')}")


if __name__ == "__main__":
    main()
