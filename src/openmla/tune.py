"""Tuner: measure launch configs on the current GPU and write its tuning table.

    python -m openmla.tune reduce [--out PATH] [--quick | --grid table|bench|quick] [--log JSON]
                                  [--jobs N] [--tokens 4,16] [--heads 16] [--splits 2,4]

``reduce``: for every (tokens, heads, D = 512, splits) point of the grid, every candidate of
``config.reduce_candidates`` (a few dozen a point) is checked against a float64 torch merge,
then timed (:func:`openmla.reduce_timing.time_us`: calls captured in a CUDA graph, input copies
rotated past twice the L2, median replay); the fastest goes to the table,
``openmla/tables/reduce_<gpu slug>.csv`` unless ``--out`` says otherwise; ``--log`` keeps every
candidate's time. The reduce launches as it does in use (programmatic dependent launch on
Hopper unless ``OPENMLA_REDUCE_PDL=0``).

Grids: ``table`` (default) tokens {4..256} x heads {16, 128} x splits {2, 4, 8, 16, 32} plus the
adaptive count of each point; ``bench``: the micro-benchmark's points (splits: adaptive and 16);
``quick``: a few points. The configs are compiled first, in ``--jobs`` processes (Triton's cache
is shared). A few minutes on an H100.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import astuple
from pathlib import Path

import torch

from openmla.config import ReduceConfig, reduce_candidates, untuned_reduce_config

TOKENS = (4, 16, 32, 64, 128, 256)
HEADS = (16, 128)
SPLITS = (2, 4, 8, 16, 32)
QUICK = {"tokens": (4, 32, 256), "heads": (16, 128), "splits": (4, 16)}
BENCH_FIXED_SPLITS = 16
D = 512


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _compile_chunk(configs: list[tuple[int, ...]]) -> int:
    """Worker: compile each config by a tiny dense launch (the shapes are not specialised on, so
    the real launches hit Triton's cache)."""
    from openmla.kernels.merge import launch_merge_dense

    dev = torch.device("cuda")
    heads = 16
    part_o = torch.zeros(2 * 2 * heads, D, device=dev)
    part_lse = torch.zeros(2 * 2 * heads, device=dev)
    out = torch.empty(2, heads, D, dtype=torch.bfloat16, device=dev)
    lse = torch.empty(2, heads, device=dev)
    for c in configs:
        launch_merge_dense(part_o=part_o, part_lse=part_lse, out=out, lse=lse, num_parts=2,
                           config=ReduceConfig(*c))
    torch.cuda.synchronize()
    return len(configs)


def precompile(configs: list[ReduceConfig], jobs: int) -> None:
    """Compile ``configs`` in ``jobs`` worker processes (Triton's on-disk cache is shared)."""
    configs = list(dict.fromkeys(configs))
    if jobs <= 1 or len(configs) < 4:
        _compile_chunk([astuple(c) for c in configs])
        return
    import concurrent.futures
    import multiprocessing

    from openmla.tune import _compile_chunk as compile_chunk  # by module name, not __main__, for spawn

    chunks = [[astuple(c) for c in configs[i::jobs]] for i in range(jobs)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        done = sum(pool.map(compile_chunk, [c for c in chunks if c]))
    print(f"compiled {done} configs in {jobs} processes", flush=True)


def tune_point(tokens: int, heads: int, d: int, splits: int, candidates: tuple[ReduceConfig, ...],
               untuned: ReduceConfig, time_fn: Callable[[list], float], device: torch.device,
               rotations: int = 1, log: dict | None = None, recheck: int = 0,
               ) -> tuple[ReduceConfig, float, float]:
    """``(best config, its us, untuned us)`` at one point; ``time_fn`` times a list of calls (one
    per rotation). A candidate that fails its check or its launch is reported and left out.
    ``log``: filled with every candidate's time. ``recheck``: time the fastest ``recheck`` and
    the untuned config a second time, keeping the better time of each."""
    from openmla.kernels.merge import launch_merge_dense
    from openmla.reduce_timing import check_merge, make_partials, reference_merge

    part_o, part_lse = make_partials(splits, tokens, heads, d, rotations, device, seed=tokens * heads + splits)
    ref_out, ref_lse = reference_merge(part_o[0], part_lse[0])
    out = torch.empty(tokens, heads, d, dtype=torch.bfloat16, device=device)
    lse = torch.empty(tokens, heads, device=device)

    def call(cfg: ReduceConfig, r: int) -> None:
        launch_merge_dense(part_o=part_o[r].view(-1, d), part_lse=part_lse[r].view(-1), out=out, lse=lse,
                           num_parts=splits, config=cfg)

    times = {}
    for cfg in dict.fromkeys([untuned, *candidates]):
        try:
            out.fill_(float("nan"))
            call(cfg, 0)
            check_merge(out, lse, ref_out, ref_lse)
            times[cfg] = time_fn([lambda cfg=cfg, r=r: call(cfg, r) for r in range(rotations)])
        except Exception as exc:  # noqa: BLE001 - a failing candidate is a data point, not the end
            print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
    if not times:
        raise RuntimeError(f"no reduce candidate ran at tokens={tokens} heads={heads} d={d} splits={splits}")
    # near ties are settled by noise: time the leaders and the untuned config once more, keep the
    # better of the two medians
    for cfg in dict.fromkeys([*sorted(times, key=times.get)[:recheck], untuned]):
        if cfg in times and recheck:
            times[cfg] = min(times[cfg], time_fn([lambda cfg=cfg, r=r: call(cfg, r) for r in range(rotations)]))
    best = min(times, key=times.get)
    if log is not None:
        log["times"] = {config_id(c): round(us, 3) for c, us in sorted(times.items(), key=lambda kv: kv[1])}
    return best, times[best], times.get(untuned, math.nan)


def config_id(cfg: ReduceConfig) -> str:
    return f"h{cfg.block_h}d{cfg.block_d}s{cfg.block_s}w{cfg.num_warps}st{cfg.num_stages}"


def table_row(info: dict[str, str], key: tuple[int, int, int, int], cfg: ReduceConfig, us: float,
              untuned_us: float) -> dict[str, object]:
    tokens, heads, d, splits = key
    return {**info, "tokens": tokens, "heads": heads, "d": d, "splits": splits,
            "block_h": cfg.block_h, "block_d": cfg.block_d, "block_s": cfg.block_s,
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "us": f"{us:.2f}", "untuned_us": f"{untuned_us:.2f}"}


def write_table(rows: list[dict[str, object]], path: Path) -> None:
    from openmla.tuning import TABLE_COLUMNS

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def grid_points(args: argparse.Namespace, sm_count: int) -> list[tuple[int, int, int]]:
    from openmla.tuning import adaptive_num_splits

    name = "quick" if args.quick else args.grid
    base = QUICK if name == "quick" else {"tokens": TOKENS, "heads": HEADS, "splits": SPLITS}
    tokens = args.tokens or base["tokens"]
    heads = args.heads or base["heads"]
    points = []
    for t in tokens:
        for h in heads:
            if name == "bench":
                splits = sorted({adaptive_num_splits(t, h, sm_count), BENCH_FIXED_SPLITS})
            else:
                splits = sorted({*(args.splits or base["splits"]), adaptive_num_splits(t, h, sm_count)})
            points += [(t, h, s) for s in splits]
    return points


def tune_reduce(args: argparse.Namespace) -> int:
    from openmla.reduce_timing import merge_bytes, provenance, rotations_for, time_us
    from openmla.tuning import table_path

    info = provenance(command=" ".join(["python -m openmla.tune", *sys.argv[1:]]))
    sm_count = int(info["sm_count"])
    out_path = Path(args.out) if args.out else table_path(info["gpu"])
    points = grid_points(args, sm_count)

    print(f"tuning the reduce on {info['gpu']} ({sm_count} SMs), {len(points)} points -> {out_path}", flush=True)
    untuned = untuned_reduce_config(D)
    precompile([untuned, *(c for _, h, s in points for c in reduce_candidates(s, h, D))], args.jobs)

    dev = torch.device("cuda")
    rows, speedups, logs = [], [], []
    for t, h, s in points:
        rot = rotations_for(merge_bytes(s, t, h, D), dev)
        log: dict = {"tokens": t, "heads": h, "d": D, "splits": s, "rotations": rot}
        best, us, untuned_us = tune_point(t, h, D, s, reduce_candidates(s, h, D), untuned, time_us, dev, rot, log,
                                          recheck=3)
        log |= {"best": config_id(best), "us": round(us, 3), "untuned_us": round(untuned_us, 3)}
        logs.append(log)
        if args.log:  # after every point: a run cut short keeps what it measured
            Path(args.log).write_text(json.dumps({"provenance": info, "points": logs}, indent=1))
        torch.cuda.empty_cache()
        speedups.append(untuned_us / us)
        print(f"T{t:<4} H{h:<4} S{s:<3} {us:8.2f} us (untuned {untuned_us:8.2f}, "
              f"{untuned_us / us:4.2f}x, {merge_bytes(s, t, h, D) / us / 1e3:5.0f} GB/s)  {config_id(best)}",
              flush=True)
        rows.append(table_row(info, (t, h, D, s), best, us, untuned_us))
    write_table(rows, out_path)
    geo = math.exp(sum(math.log(x) for x in speedups) / len(speedups))
    if args.log:
        Path(args.log).write_text(json.dumps({"provenance": info, "geomean_vs_untuned": geo, "points": logs},
                                             indent=1))
    print(f"wrote {len(rows)} rows to {out_path}; geometric mean speedup over untuned {geo:.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m openmla.tune", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("reduce", help="the LSE-reduce (merge) kernel's table")
    r.add_argument("--out", help="CSV to write (default: the package's table for this GPU)")
    r.add_argument("--quick", action="store_true", help="the quick grid (same as --grid quick)")
    r.add_argument("--grid", choices=("table", "bench", "quick"), default="table")
    r.add_argument("--log", help="JSON file for every candidate's time at every point")
    r.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1),
                   help="processes compiling the configs first")
    r.add_argument("--tokens", type=_ints, help="comma-separated token counts")
    r.add_argument("--heads", type=_ints, help="comma-separated head counts")
    r.add_argument("--splits", type=_ints, help="comma-separated split counts (the adaptive one is added)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("openmla.tune measures kernels on a CUDA GPU and found none (torch.cuda.is_available() "
              "is False); run it on the GPU whose table you want.", file=sys.stderr)
        return 2
    from openmla._interp import is_interpreting

    if is_interpreting():
        print("openmla.tune cannot time kernels under TRITON_INTERPRET=1; unset it.", file=sys.stderr)
        return 2
    return tune_reduce(args)


if __name__ == "__main__":
    sys.exit(main())
