"""Where the host time of ``run()`` goes: cProfile over repeated calls on one workload.

    python benchmarks/profile_host.py [--workloads W7,W2] [--calls 200] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

from openmla import BatchMLAPagedAttentionWrapper
from openmla.workloads import WORKLOADS, make_device_batch, plan_args


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workloads", default="W7,W2")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    for name in args.workloads.split(","):
        b = make_device_batch(WORKLOADS[name], "cuda")
        w = BatchMLAPagedAttentionWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
        w.plan(*plan_args(b))
        out = torch.empty_like(b.q_nope)
        lse = torch.empty(b.q_nope.shape[:2], dtype=torch.float32, device="cuda")
        for _ in range(5):
            w.run(b.q_nope, b.q_pe, b.ckv_cache, b.kpe_cache, out=out, lse=lse)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for i in range(args.calls):
            w.run(b.q_nope, b.q_pe, b.ckv_cache, b.kpe_cache, out=out, lse=lse)
            if i % 8 == 7:
                torch.cuda.synchronize()
        prof.disable()
        print(f"== {name} ({w.backend}), {args.calls} calls")
        pstats.Stats(prof).strip_dirs().sort_stats("tottime").print_stats(args.top)
        del b
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
