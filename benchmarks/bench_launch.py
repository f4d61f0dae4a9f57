"""Host-side cost of one decode call: how long the CPU spends per ``run()`` when the GPU work is
tiny, split into the wrapper's checks, Triton's launch path and a direct launch of the compiled
kernel, beside FlashInfer's ``run()`` on the same batch.

    python benchmarks/bench_launch.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from openmla import BatchMLAPagedAttentionWrapper
from openmla.ops import run_planned_decode
from openmla.workloads import Workload, make_device_batch, plan_args


def per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    w = Workload("tiny", "launch cost", 4, 1, (64,) * 4, 16)
    b = make_device_batch(w, "cuda")
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    ours = BatchMLAPagedAttentionWrapper(ws)
    ours.plan(*plan_args(b))
    out = torch.empty_like(b.q_nope)
    lse = torch.empty(b.q_nope.shape[:2], dtype=torch.float32, device="cuda")
    res = {}
    res["openmla run()"] = per_call_us(
        lambda: ours.run(b.q_nope, b.q_pe, b.ckv_cache, b.kpe_cache, out=out, lse=lse), args.calls)
    pl = ours._plan
    res["openmla launch only"] = per_call_us(
        lambda: run_planned_decode(b.q_nope, b.q_pe, b.ckv_cache, b.kpe_cache, pl.kv_indices, pl.arrays,
                                   ours._part_o, ours._part_lse, out, lse, ours._counters, pl.sm_scale,
                                   pl.causal, pl.sizes[4], pl.config, bool(pl.sizes[5])), args.calls)
    x = torch.zeros(16, device="cuda")
    res["torch x.add_(1)"] = per_call_us(lambda: x.add_(1), args.calls)
    try:
        import flashinfer

        fi = flashinfer.mla.BatchMLAPagedAttentionWrapper(
            torch.empty(64 << 20, dtype=torch.int8, device="cuda"), backend="fa3")
        fi.plan(*plan_args(b))
        res["flashinfer fa3 run()"] = per_call_us(
            lambda: fi.run(b.q_nope, b.q_pe, b.ckv_cache, b.kpe_cache, out=out), args.calls)
    except Exception as exc:  # noqa: BLE001
        print(f"flashinfer unavailable: {type(exc).__name__}: {exc}")
    for k, v in res.items():
        print(f"  {k:<28} {v:7.1f} us/call")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
