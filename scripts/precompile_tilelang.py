"""Compile TileLang kernels in parallel processes before the GPU tests, so the tests load them
from TileLang's disk cache instead of compiling one at a time (about 12 s each on the GPU
machine). Usage: python scripts/precompile_tilelang.py [--jobs 12] [--set tests|kv_as_m]

A variant is ``(schedule, heads, page, dtype, causal, block_m, ds_mla[, batched_reduce[, converter[,
split_rows[, num_stages]]]])``, as the GPU tests and the benchmarks plan them (read off their
tables; a kernel missing here compiles in the test).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

BF16, F16 = "bfloat16", "float16"
KV_AS_M = [("kv_as_m", *v) for v in (  # (heads, page, dtype, causal, block_m, ds_mla)
    (16, 64, BF16, False, 16, False), (4, 64, BF16, False, 16, False), (16, 128, BF16, True, 32, False),
    (9, 64, F16, True, 32, False), (1, 64, F16, False, 16, False), (24, 192, BF16, True, 32, False),
    (8, 64, BF16, False, 16, False), (16, 64, BF16, True, 32, False), (16, 64, BF16, False, 32, False),
    (32, 64, BF16, False, 32, False), (16, 64, F16, False, 16, False), (4, 64, BF16, True, 16, False),
    (32, 64, F16, True, 32, False),
    (16, 64, BF16, False, 16, True), (8, 128, BF16, True, 32, True), (24, 64, BF16, True, 32, True),
    (9, 192, BF16, False, 16, True), (1, 64, BF16, False, 16, True), (16, 64, BF16, False, 32, True),
    (16, 64, BF16, True, 32, True),
)]
# the 64-row kernel: tests/test_decode_tilelang.py under each schedule, its 656-byte cases under
# seesaw, and the 64/128-head cases of the other GPU test files
_ROWS64_PLAIN = [(128, 64, BF16, False), (128, 64, BF16, True), (64, 128, F16, True), (64, 64, F16, False),
                 (128, 192, F16, True), (128, 64, F16, True)]
_ROWS64_DS_MLA = [(128, 64, True), (128, 64, False), (64, 128, True), (64, 64, False), (128, 192, True),
                  (16, 64, False), (8, 128, True), (24, 64, True), (32, 64, False)]
ROWS64 = ([(s, h, p, d, c, 64, False) for s in ("seesaw", "seesaw_split", "auto_ws") for h, p, d, c in _ROWS64_PLAIN]
          + [("seesaw", h, p, BF16, c, 64, True) for h, p, c in _ROWS64_DS_MLA])
# kv_as_m with one softmax reduction per column (``batched_reduce=False``; batched is the default):
# tests/test_decode_kv_as_m.py's cases and the W1 / W6 / W5 / W1h32 / W8 shapes the A/B runs time
KV_AS_M_PER_COLUMN = [(*KV_AS_M[i], False) for i in (0, 1, 2, 5, 14, 7, 9, 13)]
# 656-byte rows on kv_as_m with the converting warpgroup (``converter=True``, off by default):
# test_kv_as_m_fp8_converter's cases and W8's shape
KV_AS_M_CONVERTER = [(*KV_AS_M[i], None, True) for i in (13, 14, 15)]
# 32-row kv_as_m tiles on two MMA warpgroups (``split_rows=True``, off by default):
# test_kv_as_m_split_rows's cases and the W5 / W1h32 shapes
KV_AS_M_SPLIT = [(*KV_AS_M[i], None, None, True) for i in (2, 5, 7, 9)]
# 656-byte rows at 16-row tiles in two TMA stages (three by default): test_kv_as_m_ds_mla_stages's
# cases and W8's shape
KV_AS_M_TWO_STAGES = [(*KV_AS_M[i], None, None, None, 2) for i in (13, 16, 17)]
_KV_AS_M_ALL = KV_AS_M + KV_AS_M_PER_COLUMN + KV_AS_M_CONVERTER + KV_AS_M_SPLIT + KV_AS_M_TWO_STAGES
SETS = {"kv_as_m": _KV_AS_M_ALL, "tests": _KV_AS_M_ALL + ROWS64}


def _compile(variant: tuple) -> tuple[tuple, float, str]:
    from openmla.kernels.decode_tilelang import build_kernel

    schedule, heads, page, dtype, causal, block_m, ds_mla, *extra = variant
    batched, converter, split_rows, stages = (*extra, None, None, None, None)[:4]
    t = time.time()
    try:
        build_kernel(heads, page, dtype, causal, schedule=schedule, block_m=block_m, ds_mla=ds_mla,
                     batched_reduce=batched, converter=converter, split_rows=split_rows, num_stages=stages)
        return variant, time.time() - t, "ok"
    except Exception as exc:  # noqa: BLE001 - reported, the tests will show it again
        return variant, time.time() - t, f"{type(exc).__name__}: {str(exc)[:200]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument("--set", default="tests", choices=sorted(SETS))
    a = p.parse_args()
    variants = sorted(set(SETS[a.set]), key=str)
    t = time.time()
    with ProcessPoolExecutor(a.jobs) as pool:
        for fut in as_completed([pool.submit(_compile, v) for v in variants]):
            variant, secs, status = fut.result()
            print(f"{variant}: {secs:.1f} s {status}", flush=True)
    print(f"precompiled {len(variants)} kernels in {time.time() - t:.1f} s")


if __name__ == "__main__":
    main()
