"""How fast any reduce could be at each point of the reduce micro-benchmark's grid, under its
timer: the ceiling of the "x the untuned reduce" ratio.

    python benchmarks/bench_reduce_floor.py [--json FILE] [--tokens 4,16] [--heads 16,128]

A *floor probe* reads exactly the bytes a merge must read (every fp32 partial and LSE) and writes
the bytes it must write (the bf16 output and the fp32 LSE), with no other work: the partials
summed, the LSEs' maximum, all loads of a program issued before the first add. It is launched
like our reduce (programmatic dependent launch on Hopper, waiting before its first load) and
timed like it (``reduce_timing.time_us``: CUDA graph, inputs rotated past twice the L2). At each
point the probe runs at every config of a sweep (elements a program, warps) and its best time is
the point's floor; an empty kernel gives the launch floor alone. ``untuned / floor`` at a point
is the most a reduce doing the same work can gain there over the untuned reduce; the geometric
mean of these over the grid is the ceiling of the benchmark's "vs untuned" figure.
Our tuned and untuned reduce are timed in the same process, beside the probe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from openmla import merge_states
from openmla.config import untuned_reduce_config
from openmla.kernels.merge import use_pdl
from openmla.reduce_timing import make_partials, merge_bytes, provenance, rotations_for, time_us
from openmla.tuning import reduce_config

sys.path.insert(0, str(Path(__file__).parent))
from bench_reduce import HEADS, TOKENS, D, geomean, grid_points, short

# (partial elements a program reads from each piece, warps): 2 to 16 elements a thread; the small
# blocks give the small points enough programs
PROBE_CONFIGS = ((64, 1), (128, 1), (128, 2), (256, 1), (256, 2), (512, 2), (512, 4), (1024, 4), (1024, 8),
                 (2048, 4), (2048, 8), (4096, 8))


@triton.jit
def _floor_probe(part_o, part_lse, out, lse, n_elems, n_rows, D: tl.constexpr, S: tl.constexpr,
                 BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elems
    row = offs // D
    first = mask & (offs % D == 0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for s in tl.static_range(S):
        acc += tl.load(part_o + s * n_elems + offs, mask=mask, other=0.0)
        m = tl.maximum(m, tl.load(part_lse + s * n_rows + row, mask=first, other=float("-inf")))
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=mask)
    tl.store(lse + row, m, mask=first)


@triton.jit
def _empty_probe(lse, USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(lse, 0.0)


def probe_call(part_o, part_lse, out, lse, block: int, warps: int, pdl: bool):
    splits = part_o.shape[0]
    n_elems, n_rows = out.numel(), lse.numel()
    grid = (triton.cdiv(n_elems, block),)
    kwargs = {"launch_pdl": True} if pdl else {}
    return lambda: _floor_probe[grid](part_o, part_lse, out, lse, n_elems, n_rows, D=D, S=splits, BLOCK=block,
                                      USE_PDL=pdl, num_warps=warps, **kwargs)


def check_probe(part_o, part_lse, out, lse) -> None:
    """The probe reads what it should: its sum and max against torch's."""
    torch.testing.assert_close(out.float(), part_o.sum(0).to(out.dtype).float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse, part_lse.amax(0))


def bench_point(tokens: int, heads: int, splits: int, label: str, dev: torch.device, pdl: bool) -> dict:
    rot = rotations_for(merge_bytes(splits, tokens, heads, D), dev)
    part_o, part_lse = make_partials(splits, tokens, heads, D, rot, dev, seed=tokens + heads + splits)
    out = torch.empty(tokens, heads, D, dtype=torch.bfloat16, device=dev)
    lse = torch.empty(tokens, heads, device=dev)
    row = {"tokens": tokens, "heads": heads, "splits": splits, "splits_label": label, "rotations": rot}
    for name, cfg in (("tuned", reduce_config(tokens, heads, D, splits, dev)), ("untuned", untuned_reduce_config(D))):
        row[name] = round(time_us([lambda r=r, c=cfg: merge_states(part_o[r], part_lse[r], out=out, lse=lse, config=c)
                                   for r in range(rot)]), 2)
        row[f"{name}_config"] = short(cfg)
    probes = {}
    for block, warps in PROBE_CONFIGS:
        calls = [probe_call(part_o[r], part_lse[r], out, lse, block, warps, pdl) for r in range(rot)]
        calls[0]()
        check_probe(part_o[0], part_lse[0], out, lse)
        probes[f"b{block}w{warps}"] = round(time_us(calls), 2)
    best = min(probes, key=probes.get)
    row |= {"floor": probes[best], "floor_config": best, "probes": probes,
            "floor_GBps": round(merge_bytes(splits, tokens, heads, D) / probes[best] / 1e3)}
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=str(Path(os.environ.get("OUT", ".")) / "bench_reduce_floor.json"))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--heads", default=",".join(map(str, HEADS)))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_reduce_floor.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    pdl = use_pdl(dev)
    info = provenance() | {"reduce_pdl": pdl}
    print(json.dumps(info), flush=True)
    flag = torch.empty(1, device=dev)
    empty_us = round(time_us([lambda: _empty_probe[(1,)](flag, USE_PDL=pdl, **({"launch_pdl": True} if pdl else {}))]),
                     2)
    print(f"empty kernel: {empty_us} us", flush=True)
    rows = []
    for t in map(int, args.tokens.split(",")):
        for h in map(int, args.heads.split(",")):
            for s, label in grid_points(t, h, int(info["sm_count"])).items():
                row = bench_point(t, h, s, label, dev, pdl)
                rows.append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    print("\n| T | H | splits | untuned us | tuned us | floor us (probe) | floor GB/s | untuned / floor "
          "| tuned / floor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['tokens']} | {r['heads']} | {r['splits']} ({r['splits_label']}) | {r['untuned']:.2f} | "
              f"{r['tuned']:.2f} | {r['floor']:.2f} ({r['floor_config']}) | {r['floor_GBps']} | "
              f"{r['untuned'] / r['floor']:.2f}x | {r['tuned'] / r['floor']:.2f}x |")
    summary = {
        "empty_kernel_us": empty_us,
        "geomean_tuned_vs_untuned": round(geomean(r["untuned"] / r["tuned"] for r in rows), 3),
        "geomean_ceiling_vs_untuned": round(geomean(r["untuned"] / min(r["floor"], r["tuned"]) for r in rows), 3),
        "geomean_tuned_over_floor": round(geomean(r["tuned"] / r["floor"] for r in rows), 3),
    }
    print()
    for k, v in summary.items():
        print(f"{k}: {v}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"provenance": info, "rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
