"""Reduce (LSE-merge) micro-benchmark: our tuned reduce beside the untuned one, FlashInfer's
merge_states and the plain torch merge, with provenance.

    python benchmarks/bench_reduce.py [--json FILE] [--tokens 4,16] [--heads 16,128] [--no-peer]

Grid: tokens {4, 16, 32, 64, 128, 256} x heads {16, 128}, D 512, splits {adaptive, 16}
(adaptive: the fewest splits whose decode fills the GPU, ``openmla.tuning.adaptive_num_splits``).
Each variant is checked against a float64 torch merge, then timed by
``openmla.reduce_timing.time_us``: at least 20 calls captured in a CUDA graph, each on its own
copy of the inputs (copies enough to make the footprint twice the L2), median of 9 timed
replays, divided by the calls. A peer whose calls cannot be captured is timed launching from
Python (``timer: stream``). GB/s counts the partials read (fp32; bf16 for FlashInfer, which
takes 16-bit partials), the LSEs read, the bf16 output and fp32 LSE written. Partial tiles:
splits x tokens ``[H, D]`` tiles.

The timer is checked first (``timer_check`` in the JSON): a 1 GiB device copy (the memory
ceiling) and the torch merge, graph against stream launches, where they must agree (large) and
where host overhead hides the kernel (small).

FlashInfer is called inside try blocks that synchronise; a launch error it leaves pending is
cleared (``openmla.reduce_timing.cuda_state``) and recorded for that point. A sticky CUDA error
ends the peer: the rows so far are saved and the script restarts itself without the peer for the
remaining points (``--resume``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from openmla import merge_states
from openmla.config import untuned_reduce_config
from openmla.kernels.merge import use_pdl
from openmla.reduce_timing import (
    LOG2E,
    check_merge,
    copy_gbps,
    cuda_state,
    make_partials,
    merge_bytes,
    provenance,
    reference_merge,
    rotations_for,
    time_us,
    time_us_stream,
    torch_merge,
)
from openmla.tuning import active_table_path, adaptive_num_splits, load_reduce_table, lookup, reduce_config

D = 512
TOKENS = (4, 16, 32, 64, 128, 256)
HEADS = (16, 128)
FIXED_SPLITS = 16
GOALS = {"must": {"untuned": 1.5, "torch": 3.0}, "goal": {"untuned": 1.9, "GBps_T>=64": 2000}}


def short(cfg) -> str:
    return f"h{cfg.block_h} d{cfg.block_d} s{cfg.block_s} w{cfg.num_warps} st{cfg.num_stages}"


def table_source(gpu: str, tokens: int, heads: int, splits: int) -> str:
    table = load_reduce_table(active_table_path(gpu))
    if (tokens, heads, D, splits) in table:
        return "exact"
    return "nearest" if lookup(table, tokens, heads, D, splits) else "heuristic"


def flashinfer_variant(part_o: torch.Tensor, part_lse: torch.Tensor, splits: int, tokens: int, heads: int):
    """FlashInfer's merge_states on bf16 copies in its layout (``[T, S, H, D]``, base-2 LSE), as
    many copies as make its own (halved) footprint twice the L2: ``(calls, output of copy 0 as
    (out, natural-log lse), the bf16 rounding of the partials)``."""
    import flashinfer

    copies = rotations_for(merge_bytes(splits, tokens, heads, D, partial_bytes=2), part_o.device)
    v = [part_o[r % part_o.shape[0]].to(torch.bfloat16).transpose(0, 1).contiguous() for r in range(copies)]
    s = [(part_lse[r % part_o.shape[0]] * LOG2E).transpose(0, 1).contiguous() for r in range(copies)]
    out, lse2 = flashinfer.merge_states(v[0], s[0])
    torch.cuda.synchronize()  # a failed launch surfaces here, inside the caller's try
    rounding = torch.finfo(torch.bfloat16).eps / 2 * part_o[0].abs().amax().item()
    calls = [lambda r=r: flashinfer.merge_states(v[r], s[r]) for r in range(copies)]
    return calls, (out, lse2 / LOG2E), rounding


def peer_row(base: dict, part_o, part_lse, ref, splits: int, tokens: int, heads: int) -> tuple[dict, str]:
    """FlashInfer's row at one point and the CUDA state after it (``cuda_state``)."""
    row = {**base, "impl": "flashinfer", "us": None, "GBps": None}
    try:
        calls, output, rounding = flashinfer_variant(part_o, part_lse, splits, tokens, heads)
        check_merge(*output, *ref, partial_rounding=rounding)
        try:
            us, timer = time_us(calls), "graph"
        except Exception as exc:  # not capturable: time it from Python
            if cuda_state() == "sticky":
                raise
            us, timer = time_us_stream(calls), "stream"
            row["capture_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        gbps = merge_bytes(splits, tokens, heads, D, partial_bytes=2) / us / 1e3
        row |= {"us": round(us, 2), "GBps": round(gbps), "timer": timer}
    except Exception as exc:  # noqa: BLE001 - the peer failing at a point is a result
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    state = cuda_state()
    if state != "ok":
        row["cuda_state"] = state
    return row, state


def bench_point(tokens: int, heads: int, splits: int, label: str, gpu: str, peer: bool,
                dev: torch.device) -> tuple[list[dict], str]:
    rot = rotations_for(merge_bytes(splits, tokens, heads, D), dev)
    part_o, part_lse = make_partials(splits, tokens, heads, D, rot, dev, seed=tokens + heads + splits)
    ref = reference_merge(part_o[0], part_lse[0])
    out = torch.empty(tokens, heads, D, dtype=torch.bfloat16, device=dev)
    lse = torch.empty(tokens, heads, device=dev)
    tuned = reduce_config(tokens, heads, D, splits, dev)
    untuned = untuned_reduce_config(D)
    base = {"tokens": tokens, "heads": heads, "d": D, "splits": splits, "splits_label": label,
            "partial_tiles": splits * tokens, "rotations": rot}
    rows = []

    def record(impl: str, calls: list, output, extra: dict | None = None) -> None:
        check_merge(*output, *ref)
        us = time_us(calls)
        gbps = merge_bytes(splits, tokens, heads, D) / us / 1e3
        rows.append({**base, "impl": impl, "us": round(us, 2), "GBps": round(gbps), "timer": "graph",
                     **(extra or {})})

    def ours(cfg):
        out.fill_(float("nan"))
        calls = [lambda r=r: merge_states(part_o[r], part_lse[r], out=out, lse=lse, config=cfg)
                 for r in range(rot)]
        return calls, merge_states(part_o[0], part_lse[0], out=out, lse=lse, config=cfg)

    record("tuned", *ours(tuned), extra={"config": short(tuned), "table": table_source(gpu, tokens, heads, splits)})
    record("untuned", *ours(untuned), extra={"config": short(untuned)})
    record("torch", [lambda r=r: torch_merge(part_o[r], part_lse[r], torch.bfloat16) for r in range(rot)],
           torch_merge(part_o[0], part_lse[0], torch.bfloat16))
    state = "ok"
    if peer:
        row, state = peer_row(base, part_o, part_lse, ref, splits, tokens, heads)
        rows.append(row)
    return rows, state


def _timer_check_point(tokens: int, heads: int, splits: int, dev: torch.device) -> dict:
    rot = rotations_for(merge_bytes(splits, tokens, heads, D), dev)
    part_o, part_lse = make_partials(splits, tokens, heads, D, rot, dev)
    out = torch.empty(tokens, heads, D, dtype=torch.bfloat16, device=dev)
    lse = torch.empty(tokens, heads, device=dev)
    untuned = untuned_reduce_config(D)
    variants = {
        "torch": [lambda r=r: torch_merge(part_o[r], part_lse[r], torch.bfloat16) for r in range(rot)],
        "untuned": [lambda r=r: merge_states(part_o[r], part_lse[r], out=out, lse=lse, config=untuned)
                    for r in range(rot)],
    }
    result = {}
    for name, calls in variants.items():
        graph, stream = time_us(calls), time_us_stream(calls)
        result[f"T{tokens}_H{heads}_S{splits}_{name}"] = {
            "graph_us": round(graph, 2), "stream_us": round(stream, 2),
            "stream_over_graph": round(stream / graph, 3),
            "graph_GBps": round(merge_bytes(splits, tokens, heads, D) / graph / 1e3)}
    return result


def timer_check(dev: torch.device) -> dict:
    """The timer against a device copy and against stream launches (see the module doc)."""
    result: dict = {"copy_GBps": round(copy_gbps())}
    for tokens, heads, splits in ((128, 128, 16), (4, 16, 16)):
        result |= _timer_check_point(tokens, heads, splits, dev)
        torch.cuda.empty_cache()
    return result


def geomean(values) -> float | None:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def grid_points(tokens: int, heads: int, sm_count: int) -> dict[int, str]:
    """The split counts the grid times at a point: the adaptive one, and the fixed one."""
    points = {adaptive_num_splits(tokens, heads, sm_count): "adaptive"}
    points.setdefault(FIXED_SPLITS, "fixed")
    return points


def summarise(rows: list[dict]) -> dict:
    by_point: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_point.setdefault((r["tokens"], r["heads"], r["splits_label"]), {})[r["impl"]] = r
    ratios: dict[str, list[float]] = {"untuned": [], "torch": [], "flashinfer": []}
    flashinfer_lost = []
    for point, impls in by_point.items():
        ours = impls["tuned"]["us"]
        for peer, values in ratios.items():
            if impls.get(peer, {}).get("us"):
                values.append(impls[peer]["us"] / ours)
        fi = impls.get("flashinfer")
        if fi and fi["us"] is not None and fi["us"] < ours:
            flashinfer_lost.append(point)
    big = [r["GBps"] for r in rows if r["impl"] == "tuned" and r["tokens"] >= 64]
    geo = {k: geomean(v) for k, v in ratios.items()}
    summary = {f"geomean_speedup_vs_{k}": v for k, v in geo.items()} | {
        "flashinfer_points_timed": len(ratios["flashinfer"]),
        "flashinfer_points_failed": [list(p) for p, i in by_point.items() if i.get("flashinfer", {}).get("error")],
        "min_tuned_GBps_T>=64": min(big) if big else None,
        "points_where_flashinfer_is_faster": [list(p) for p in flashinfer_lost],
    }
    summary["must_vs_untuned_1.5x"] = bool(geo["untuned"] and geo["untuned"] >= GOALS["must"]["untuned"])
    summary["must_vs_torch_3x"] = bool(geo["torch"] and geo["torch"] >= GOALS["must"]["torch"])
    summary["goal_vs_untuned_1.9x"] = bool(geo["untuned"] and geo["untuned"] >= GOALS["goal"]["untuned"])
    summary["goal_2000GBps_T>=64"] = bool(big and min(big) >= GOALS["goal"]["GBps_T>=64"])
    summary["goal_faster_than_flashinfer_everywhere"] = not flashinfer_lost and bool(ratios["flashinfer"])
    return summary


def print_table(rows: list[dict], summary: dict) -> None:
    by_point: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_point.setdefault((r["tokens"], r["heads"], r["splits"], r["splits_label"], r["partial_tiles"]),
                            {})[r["impl"]] = r
    print("\n| T | H | splits | tiles | tuned us | GB/s | untuned us | torch us | flashinfer us | "
          "vs untuned | vs torch | vs flashinfer | config (table) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (t, h, s, label, tiles), impls in by_point.items():
        o = impls["tuned"]
        cells = []
        for name in ("untuned", "torch", "flashinfer"):
            r = impls.get(name)
            cells.append("-" if r is None else "fail" if r["us"] is None else f"{r['us']:.2f}")
        for name in ("untuned", "torch", "flashinfer"):
            r = impls.get(name)
            cells.append("-" if r is None or r["us"] is None else f"{r['us'] / o['us']:.2f}x")
        print(f"| {t} | {h} | {s} ({label}) | {tiles} | {o['us']:.2f} | {o['GBps']} | " + " | ".join(cells)
              + f" | {o['config']} ({o['table']}) |")
    print()
    for k, v in summary.items():
        print(f"{k}: {v if not isinstance(v, float) else round(v, 2)}")


def _restart_without_peer(args: argparse.Namespace, state: dict) -> None:
    """A sticky CUDA error: nothing more runs in this process. Save what we have, run again."""
    partial = Path(args.json).with_suffix(".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text(json.dumps(state))
    argv = [sys.executable, os.path.abspath(__file__), "--json", args.json, "--tokens", args.tokens,
            "--heads", args.heads, "--no-peer", "--resume", str(partial)]
    print(f"sticky CUDA error after FlashInfer: restarting without it ({' '.join(argv[1:])})", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=str(Path(os.environ.get("OUT", ".")) / "bench_reduce.json"))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--heads", default=",".join(map(str, HEADS)))
    p.add_argument("--no-peer", action="store_true", help="skip FlashInfer")
    p.add_argument("--no-timer-check", action="store_true", help="skip the timer's checks")
    p.add_argument("--resume", help=argparse.SUPPRESS)  # rows saved before a restart
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_reduce.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    state: dict = {"rows": [], "peer_note": None, "timer_check": None}
    if args.resume:
        state = json.loads(Path(args.resume).read_text())
        info = state["provenance"]
    else:
        info = provenance()
        info["reduce_table"] = str(active_table_path(info["gpu"]))
        info["reduce_pdl"] = use_pdl(dev)
        info["flashinfer"] = "skipped (--no-peer)"
        if not args.no_peer:
            try:
                import flashinfer

                info["flashinfer"] = flashinfer.__version__
            except Exception as exc:  # noqa: BLE001 - any import failure means "no peer"
                info["flashinfer"] = f"unavailable ({type(exc).__name__})"
        state["provenance"] = info
        print(json.dumps(info), flush=True)
        if not args.no_timer_check:
            state["timer_check"] = timer_check(dev)
            print("timer check:", json.dumps(state["timer_check"]), flush=True)
    peer = not args.no_peer and not info["flashinfer"].startswith(("unavailable", "skipped"))
    sm_count = int(info["sm_count"])
    done = {(r["tokens"], r["heads"], r["splits"]) for r in state["rows"] if r["impl"] == "tuned"}
    for t in map(int, args.tokens.split(",")):
        for h in map(int, args.heads.split(",")):
            for s, label in grid_points(t, h, sm_count).items():
                if (t, h, s) in done:
                    continue
                new, cuda = bench_point(t, h, s, label, info["gpu"], peer, dev)
                if state["peer_note"] and not peer:
                    new.append({**{k: new[0][k] for k in ("tokens", "heads", "d", "splits", "splits_label",
                                                          "partial_tiles")},
                                "impl": "flashinfer", "us": None, "GBps": None, "error": state["peer_note"]})
                torch.cuda.empty_cache()  # the point's inputs are gone: give their memory back
                state["rows"] += new
                print("  " + "  ".join(f"{r['impl']} {r['us']} us" for r in new) + f"  (T{t} H{h} S{s})",
                      flush=True)
                if cuda == "sticky":
                    state["peer_note"] = f"skipped: sticky CUDA error after FlashInfer at T{t} H{h} S{s}"
                    _restart_without_peer(args, state)
    summary = summarise(state["rows"])
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": info, "timer_check": state["timer_check"], "summary": summary,
                                "peer_note": state["peer_note"], "rows": state["rows"]}, indent=1))
    print_table(state["rows"], summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
