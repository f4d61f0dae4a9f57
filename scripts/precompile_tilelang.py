"""Compile TileLang kernels in parallel processes before the GPU tests, so the tests load them
from TileLang's disk cache instead of compiling one at a time (about 12 s each on the GPU
machine). Usage: python scripts/precompile_tilelang.py [--jobs 12] [--set kv_as_m]

The variants are ``build_kernel`` keyword sets: (heads, page, dtype, causal, block_m, ds_mla)
of the ``kv_as_m`` kernel as tests/test_decode_kv_as_m.py and the benchmarks plan them.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

KV_AS_M = [  # (heads, page, dtype, causal, block_m, ds_mla)
    (16, 64, "bfloat16", False, 16, False), (4, 64, "bfloat16", False, 16, False),
    (16, 128, "bfloat16", True, 32, False), (9, 64, "float16", True, 32, False),
    (1, 64, "float16", False, 16, False), (24, 192, "bfloat16", True, 32, False),
    (8, 64, "bfloat16", False, 16, False), (16, 64, "bfloat16", True, 32, False),
    (16, 64, "bfloat16", False, 32, False), (32, 64, "bfloat16", False, 32, False),
    (16, 64, "bfloat16", False, 16, True), (8, 128, "bfloat16", True, 32, True),
    (24, 64, "bfloat16", True, 32, True), (9, 192, "bfloat16", False, 16, True),
    (1, 64, "bfloat16", False, 16, True), (16, 64, "bfloat16", False, 32, True),
    (16, 64, "bfloat16", True, 32, True),
]
SETS = {"kv_as_m": KV_AS_M}


def _compile(variant: tuple) -> tuple[tuple, float, str]:
    from openmla.kernels.decode_tilelang import KV_AS_M as SCHEDULE
    from openmla.kernels.decode_tilelang import build_kernel

    heads, page, dtype, causal, block_m, ds_mla = variant
    t = time.time()
    try:
        build_kernel(heads, page, dtype, causal, schedule=SCHEDULE, block_m=block_m, ds_mla=ds_mla)
        return variant, time.time() - t, "ok"
    except Exception as exc:  # noqa: BLE001 - reported, the tests will show it again
        return variant, time.time() - t, f"{type(exc).__name__}: {str(exc)[:200]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument("--set", default="kv_as_m", choices=sorted(SETS))
    a = p.parse_args()
    t = time.time()
    with ProcessPoolExecutor(a.jobs) as pool:
        for fut in as_completed([pool.submit(_compile, v) for v in SETS[a.set]]):
            variant, secs, status = fut.result()
            print(f"{variant}: {secs:.1f} s {status}", flush=True)
    print(f"precompiled {len(SETS[a.set])} kernels in {time.time() - t:.1f} s")


if __name__ == "__main__":
    main()
