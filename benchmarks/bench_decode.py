"""Decode benchmark over the WORKLOADS.md workloads: openmla beside FlashInfer (fa3, fa2) in the
same run, with provenance.

    python benchmarks/bench_decode.py --out DIR [--workloads W1,W4] [--sweep] [--results FILE]

Each workload: one cache holding ``--rotations`` disjoint shuffled page tables (the timed loop
steps through them, so KV is never served from L2), median of ``triton.testing.do_bench``, the
whole decode call (split kernel + merge) with the schedule already planned. Every timed
implementation's output is checked against the float64 oracle first. openmla (default and
batch-invariant) and fa3 are also timed as CUDA-graph replays of the same calls (``graph_us``:
the GPU's time without the host's, which varies several-fold between processes on a shared
machine); ``openmla-again`` times the first row once more, last.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

from openmla import BatchMLAPagedAttentionWrapper
from openmla.config import DecodeConfig
from openmla.reference import dequantize_ds_mla_reference, mla_decode_reference
from openmla.testing import assert_attention_close
from openmla.workloads import WORKLOADS, DeviceBatch, make_device_batch, plan_args

WORKSPACE_BYTES = 128 << 20


def provenance() -> dict[str, str]:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "sms": str(torch.cuda.get_device_properties(0).multi_processor_count),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": os.environ.get("OPENMLA_COMMIT") or _git_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    try:
        import flashinfer

        info["flashinfer"] = flashinfer.__version__
    except Exception as exc:  # noqa: BLE001 - any import failure means "no peer"
        info["flashinfer"] = f"unavailable ({type(exc).__name__})"
    try:
        import tilelang

        info["tilelang"] = tilelang.__version__
    except Exception as exc:  # noqa: BLE001 - the optional compute-bound path
        info["tilelang"] = f"unavailable ({type(exc).__name__})"
    return info


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def time_rotating(fns: list, warmup_ms: int = 50, rep_ms: int = 300) -> float:
    """Median microseconds of calling ``fns[i % len(fns)]`` in turn."""
    state = itertools.cycle(fns)
    return 1e3 * triton.testing.do_bench(lambda: next(state)(), warmup=warmup_ms, rep=rep_ms,
                                         return_mode="median")


def captured(fns: list) -> list | None:
    """Each call captured in a CUDA graph, as replays: the same GPU work without the host's time
    (a serving engine's decode step replays graphs; in eager calls a slow host shows in the
    time). None when a call cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:  # warm-up off the default stream, as capture wants
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    try:
        for fn in fns:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            graphs.append(g)
    except Exception as exc:  # noqa: BLE001 - a peer that cannot be captured is a data point
        print(f"  capture failed: {type(exc).__name__}: {str(exc)[:160]}")
        return None
    return [g.replay for g in graphs]


def device_ceilings() -> dict[str, float]:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    copy_us = 1e3 * triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    read_us = 1e3 * triton.testing.do_bench(lambda: src.view(torch.int64).sum(), return_mode="median")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_us = 1e3 * triton.testing.do_bench(lambda: a @ a, return_mode="median")
    return {"copy_GBps": 2 * n / copy_us / 1e3, "read_GBps": n / read_us / 1e3,
            "bf16_mm_TFLOPs": 2 * 8192**3 / mm_us / 1e6}


class Ours:
    name = "openmla"

    def __init__(self, b: DeviceBatch, rotations: int, **plan_kw) -> None:
        self.b = b
        self.wrappers = []
        for r in range(rotations):
            w = BatchMLAPagedAttentionWrapper(torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda"))
            w.plan(*plan_args(b, r), **plan_kw)
            self.wrappers.append(w)
        self.out = torch.empty_like(b.q_nope)
        self.lse = torch.empty(b.q_nope.shape[:2], dtype=torch.float32, device="cuda")

        self.caches = (b.kv_cache, None) if b.kv_cache is not None else (b.ckv_cache, b.kpe_cache)

    def fns(self) -> list:
        b = self.b
        return [lambda w=w: w.run(b.q_nope, b.q_pe, *self.caches, out=self.out, lse=self.lse)
                for w in self.wrappers]

    def output(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.b
        return self.wrappers[0].run(b.q_nope, b.q_pe, *self.caches, return_lse=True)


class FlashInfer:
    def __init__(self, b: DeviceBatch, rotations: int, backend: str) -> None:
        import flashinfer

        self.name = f"flashinfer-{backend}"
        self.b = b
        self.wrappers = []
        for r in range(rotations):
            w = flashinfer.mla.BatchMLAPagedAttentionWrapper(
                torch.empty(WORKSPACE_BYTES, dtype=torch.int8, device="cuda"), backend=backend)
            w.plan(*plan_args(b, r, bf16_cache=True))  # fp8 workloads: its fastest option, bf16
            self.wrappers.append(w)
        self.out = torch.empty_like(b.q_nope)

    def fns(self) -> list:
        b = self.b
        return [lambda w=w: w.run(b.q_nope, b.q_pe, b.ckv_cache, b.kpe_cache, out=self.out)
                for w in self.wrappers]

    def output(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.b
        out, lse2 = self.wrappers[0].run(b.q_nope, b.q_pe, b.ckv_cache, b.kpe_cache, return_lse=True)
        return out, lse2 * 0.6931471805599453  # its LSE is base 2


def reference(b: DeviceBatch, dtype: torch.dtype, dequantised: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle on the batch's bf16 cache, or on its fp8 cache dequantised (plain torch)."""
    w = b.workload
    ckv, kpe = b.ckv_cache, b.kpe_cache
    if dequantised:
        pages = sorted(set(b.kv_indices[0].tolist()))  # dequantise only what rotation 0 reads
        ckv, kpe = torch.zeros_like(ckv), torch.zeros_like(kpe)
        sel = torch.tensor(pages, device=ckv.device)
        c, k = dequantize_ds_mla_reference(b.kv_cache[sel])
        ckv[sel], kpe[sel] = c.to(ckv.dtype), k.to(kpe.dtype)
    return mla_decode_reference(b.q_nope, b.q_pe, ckv, kpe, b.qo_indptr, b.kv_indptr,
                                b.kv_indices[0], b.kv_len, w.page_size, b.sm_scale, w.causal, dtype)


def references(b: DeviceBatch, dequantised: bool = False) -> tuple[tuple, tuple]:
    """The float64 oracle and the float32 reference (output in the queries' dtype) that
    :func:`check` compares against."""
    lowp = reference(b, torch.float32, dequantised)
    return reference(b, torch.float64, dequantised), (lowp[0].to(b.q_nope.dtype), lowp[1])


def check(impl, ref, lowp) -> str:
    out, lse = impl.output()
    try:
        errs = assert_attention_close(out, lse, ref, lowp)
    except AssertionError as exc:
        return f"FAIL ({exc})"
    return f"ok (out err {errs['out_err']:.1e} <= {errs['out_budget']:.1e})"


def slow_launches() -> dict[str, int]:
    """Launches that skip the direct paths (host time on every call): TileLang kernels called
    through its Python wrapper, Triton specialisations left on the JIT's path (-1: all)."""
    from openmla.kernels import decode_tilelang, launch

    return {"tilelang_wrapper_launches": decode_tilelang.wrapper_launches(),
            "triton_jit_launches": launch.slow_paths()}


def kernel_times(fns: list, iters: int = 30) -> dict[str, float]:
    """Mean GPU microseconds per call of each kernel, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    for fn in fns:
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            fns[i % len(fns)]()
        torch.cuda.synchronize()
    times = {}
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0)
        if total > 0:
            times[evt.key[:40]] = round(total / iters, 1)
    return times


def run_workload(name: str, args, ceilings) -> list[dict]:
    w = WORKLOADS[name]
    b = make_device_batch(w, "cuda", rotations=args.rotations)
    fp8 = b.kv_cache is not None
    refs = {}

    def refs_for(dequantised: bool):
        if dequantised not in refs:
            refs[dequantised] = references(b, dequantised)
        return refs[dequantised]

    rows = []
    timed = {}  # label -> impl, for the graph-replay times at the end

    def record(impl, label: str, extra: dict | None = None) -> None:
        timed.setdefault(label, impl)
        status = check(impl, *refs_for(fp8 and label.startswith("openmla")))
        us = time_rotating(impl.fns())
        gbps = w.bytes() / us / 1e3
        tflops = w.flops() / us / 1e6
        row = {"workload": name, "impl": label, "us": round(us, 1), "GBps": round(gbps),
               "TFLOPs": round(tflops, 1), "bw_frac": round(gbps / ceilings["read_GBps"], 3),
               "check": status, **(extra or {})}
        rows.append(row)
        print(f"  {name} {label:<40} {us:9.1f} us {gbps:7.0f} GB/s {tflops:6.1f} TFLOP/s  {status[:60]}",
              flush=True)

    ours = Ours(b, args.rotations)
    backend = ours.wrappers[0].backend
    record(ours, "openmla", {**ours.wrappers[0].plan_info, "backend": backend,
                             "kernels": kernel_times(ours.fns()), **slow_launches()})
    print(f"  {name} openmla ({backend}) kernels (profiler, us per call): {rows[-1]['kernels']}; "
          f"slow launch paths: {slow_launches()}")
    if backend != "triton" and not args.no_triton_row:  # the Triton kernel on the same shape, for the record
        os.environ["OPENMLA_DECODE_BACKEND"] = "triton"
        try:
            tri = Ours(b, args.rotations)
            record(tri, "openmla-triton", {**tri.wrappers[0].plan_info, "kernels": kernel_times(tri.fns())})
            del tri
        finally:
            del os.environ["OPENMLA_DECODE_BACKEND"]
    if backend == "tilelang" and fp8 and ours.wrappers[0].plan_info["block_m"] < 64:
        # 656-byte rows below 64 heads: the padded 64-row kernel they ran before kv_as_m
        os.environ["OPENMLA_TILELANG_SCHEDULE"] = "seesaw"
        try:
            rows64 = Ours(b, args.rotations)
            record(rows64, "openmla-64-row", {**rows64.wrappers[0].plan_info,
                                              "backend": rows64.wrappers[0].backend,
                                              "kernels": kernel_times(rows64.fns())})
            del rows64
        finally:
            del os.environ["OPENMLA_TILELANG_SCHEDULE"]
    det = Ours(b, args.rotations, deterministic=True)
    # its kernels too: a gap to the default mode is the merge's or the host's
    record(det, "openmla-deterministic", {**det.wrappers[0].plan_info, "kernels": kernel_times(det.fns())})
    if args.sweep:
        for cfg, splits in sweep_points(w):
            try:
                impl = Ours(b, args.rotations, decode_config=cfg, num_splits=splits)
            except ValueError as exc:
                print(f"  skip {cfg} splits={splits}: {exc}")
                continue
            label = (f"openmla bm{cfg.block_m} bn{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}" if cfg
                     else "openmla table-config") + f" sp{splits or 'auto'}"
            try:
                record(impl, label, impl.wrappers[0].plan_info)
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile is a data point
                print(f"  {label}: {type(exc).__name__}: {str(exc)[:200]}")
    if not args.no_peer:
        for backend in args.peers.split(","):
            try:
                impl = FlashInfer(b, args.rotations, backend)
            except Exception as exc:  # noqa: BLE001
                print(f"  flashinfer {backend} unavailable: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            record(impl, impl.name, {"kernels": kernel_times(impl.fns())})
    # the first row again, last: the first timed row of a process has been seen slower than the
    # same kernels timed later (W1 107.9 us, then 95.4 us, H200)
    record(ours, "openmla-again")
    if not args.no_graph:  # last: a failed capture leaves nothing else of this workload to spoil
        for label in ("openmla", "openmla-deterministic", "flashinfer-fa3"):
            replays = captured(timed[label].fns()) if label in timed else None
            if replays:
                us = time_rotating(replays)
                next(r for r in rows if r["impl"] == label)["graph_us"] = round(us, 1)
                print(f"  {name} {label + ' (CUDA graph replay)':<40} {us:9.1f} us", flush=True)
    del ours
    torch.cuda.empty_cache()
    return rows


def sweep_points(w) -> list[tuple[DecodeConfig, int | None]]:
    rows = w.qo_len * w.num_heads
    bm = 16 if rows <= 16 else 32 if rows <= 32 else 64
    grid = ((bm, 32, 4, 3), (bm, 32, 4, 4), (bm, 32, 8, 3), (bm, 16, 4, 4), (bm, 64, 4, 2),
            (bm, 64, 8, 2), (64, 32, 4, 2), (64, 32, 4, 3), (64, 32, 8, 3), (64, 64, 4, 2),
            (64, 64, 8, 2), (32, 32, 4, 3), (32, 64, 4, 2))
    grid = tuple(dict.fromkeys(grid))
    points = [(DecodeConfig(m, bn, warps, stages), None) for m, bn, warps, stages in grid
              if m >= bm]
    for splits in (2, 4, 8):
        points.append((None, splits))
    return points


def print_table(rows: list[dict]) -> None:
    by = {}
    for r in rows:
        by.setdefault(r["workload"], {})[r["impl"]] = r
    print("\n| workload | openmla us | GB/s | TFLOP/s | merge kernel us | deterministic us | fa3 us | fa3 GB/s "
          "| fa3/openmla | graph us: openmla, fa3 | fa2 us | check |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, impls in by.items():
        o = impls["openmla"]
        fa3 = impls.get("flashinfer-fa3")
        fa2 = impls.get("flashinfer-fa2")
        ratio = f"{fa3['us'] / o['us']:.2f}x" if fa3 else "-"
        det = impls.get("openmla-deterministic", {}).get("us", "-")
        print(f"| {name} ({o.get('backend', 'triton')}) | {o['us']} | {o['GBps']} | {o['TFLOPs']} | {o.get('kernels', {}).get('_merge_kernel', 0)} | {det} | "
              f"{fa3['us'] if fa3 else '-'} | "
              f"{fa3['GBps'] if fa3 else '-'} | {ratio} | {o.get('graph_us', '-')}, "
              f"{fa3.get('graph_us', '-') if fa3 else '-'} | {fa2['us'] if fa2 else '-'} | {o['check'][:4]} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--rotations", type=int, default=3)
    p.add_argument("--sweep", action="store_true", help="also time alternative launch configs and splits")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay times")
    p.add_argument("--peers", default="fa3,fa2", help="FlashInfer backends to time (comma list)")
    p.add_argument("--no-triton-row", action="store_true",
                   help="skip the Triton kernel's row where another backend serves the shape")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--results", default=None, help="CSV file to append rows to")
    args = p.parse_args()
    info = provenance()
    print(json.dumps(info))
    t0 = time.time()
    ceilings = device_ceilings()
    print(json.dumps(ceilings))
    rows = []
    for name in args.workloads.split(","):
        rows += run_workload(name, args, ceilings)
    print(f"total {time.time() - t0:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_decode.json").write_text(json.dumps({"provenance": info, "ceilings": ceilings,
                                                       "rows": rows}, indent=1))
    if args.results:
        path = Path(args.results)
        new = not path.exists()
        with path.open("a", newline="") as f:
            fields = ["date", "gpu", "commit", "torch", "triton", "flashinfer", "workload", "impl", "us",
                      "GBps", "TFLOPs", "bw_frac", "check"]
            wr = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                wr.writeheader()
            for r in rows:
                wr.writerow({**info, **r})
    print_table(rows)
    return 0 if all(r["check"].startswith("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
