"""Host-side cost of one decode call: how long the CPU spends per ``run()`` when the GPU work is
tiny, split into the wrapper's checks, Triton's launch path and a direct launch of the compiled
kernel, beside FlashInfer's ``run()`` on the same batch.

    python benchmarks/bench_launch.py [--calls 2000] [--workloads W7,W1h64]

With ``--workloads``, for each named workload: the host time of one ``run()`` (the GPU idle
before it), the ``do_bench`` call time, the same call replayed from a CUDA graph, and the
profiler's kernel times, so a gap between the call and its kernels can be pinned on the host
or on the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

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


def host_us(fn, calls: int = 50) -> float:
    """Median host time of one call, the GPU drained before each."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e6


def entry_host_us(call) -> dict:
    """Host time of the TileLang kernel's entry alone (TVM-FFI's argument conversion, the
    generated host code's checks and TMA descriptors, the launch), called with the arguments
    ``call`` last gave it; empty when ``call`` launches no TileLang kernel."""
    from openmla.kernels import decode_tilelang as dt

    seen = {}
    saved = dict(dt._LAUNCH_FNS)
    for key, fn in saved.items():
        def record(*args, fn=fn):
            seen["call"] = (fn, args)
            return fn(*args)
        dt._LAUNCH_FNS[key] = record
    try:
        call()
    finally:
        dt._LAUNCH_FNS.update(saved)
    if "call" not in seen:
        return {}
    fn, args = seen["call"]
    return {"tilelang_entry_host_us": host_us(lambda: fn(*args))}


def workload_overheads(names: list[str]) -> dict:
    import triton.testing
    from bench_decode import kernel_times

    from openmla.workloads import WORKLOADS

    res = {}
    for name in names:
        b = make_device_batch(WORKLOADS[name], "cuda")
        w = BatchMLAPagedAttentionWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
        w.plan(*plan_args(b))
        out = torch.empty_like(b.q_nope)
        lse = torch.empty(b.q_nope.shape[:2], dtype=torch.float32, device="cuda")

        def call(w=w, b=b, out=out, lse=lse) -> None:
            w.run(b.q_nope, b.q_pe, b.ckv_cache, b.kpe_cache, out=out, lse=lse)

        call()
        row = {"host_us": host_us(call), **entry_host_us(call),
               "call_us": 1e3 * triton.testing.do_bench(call, return_mode="median"),
               "kernels": kernel_times([call])}
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            call()
        row["graph_us"] = 1e3 * triton.testing.do_bench(g.replay, return_mode="median")
        row["backend"], row["plan"] = w.backend, w.plan_info
        print(f"  {name}: {row}", flush=True)
        res[name] = row
        del b
        torch.cuda.empty_cache()
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--workloads", default="")
    args = p.parse_args()
    if args.workloads:
        print(json.dumps(workload_overheads(args.workloads.split(","))))
        return
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
        lambda: run_planned_decode(b.q_nope, b.q_pe, b.ckv_cache, b.kpe_cache, None, pl.kv_format,
                                   pl.kv_indices, pl.arrays, ours._part_o, ours._part_lse, out, lse,
                                   ours._counters, pl.sm_scale, pl.causal, pl.sizes[4], pl.config,
                                   bool(pl.sizes[5]), pl.sizes[6], pl.merge_config), args.calls)
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
