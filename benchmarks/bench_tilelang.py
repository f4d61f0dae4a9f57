"""Variants of the TileLang kernels (the 64-row one on the 128-head workloads, ``kv_as_m`` below
64 heads): where their time goes.

    python benchmarks/bench_tilelang.py [--workloads W2,W3] [--out DIR]
    python benchmarks/bench_tilelang.py --workloads W5,W1,W1h32,W8 --variants shipped,batched-reduce

Each variant is timed as the kernel alone (``do_bench`` median over the rotated page tables of
bench_decode.py), on the plan ``BatchMLAPagedAttentionWrapper`` makes, after a check against
the float32 reference on the first rotation. Variants: the shipped kernel (the hand-scheduled
"seesaw" schedule: softmax of one warpgroup under the other's MMAs), "seesaw_split", TileLang's
automatic warp specialisation, fast math (approximate exp2/log2), BLOCK_N 32 with 3 and 4 stages,
and pinned split counts; on the 656-byte rows (W9), how many dequantisation steps run before the
P V they follow (``dq_early``). On ``kv_as_m`` plans: the shipped kernel and its batched softmax
reductions (``batched_reduce``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import WORKSPACE_BYTES, provenance, reference

from openmla import BatchMLAPagedAttentionWrapper
from openmla.kernels.decode import KV_FP8_DS_MLA
from openmla.kernels.decode_tilelang import KV_AS_M, launch_decode_tilelang
from openmla.kernels.merge import launch_merge
from openmla.ops import kv_views
from openmla.workloads import WORKLOADS, make_device_batch, plan_args

VARIANTS = {
    "shipped": {},
    "seesaw-split": {"schedule": "seesaw_split"},
    "auto-ws": {"schedule": "auto_ws"},
    "fast-math": {"fast_math": True},
    "auto-ws-bn32-s3": {"schedule": "auto_ws", "block_n": 32, "num_stages": 3},
    "auto-ws-bn32-s4": {"schedule": "auto_ws", "block_n": 32, "num_stages": 4},
    # 656-byte rows (W9): dequantisation steps run before the P V they follow (the rest under it)
    **{f"dq-early-{n}": {"dq_early": n} for n in (4, 6, 8, 10, 12, 16)},
}
FP8_VARIANTS = ("shipped",) + tuple(f"dq-early-{n}" for n in (4, 6, 8, 10, 12, 16))
KV_AS_M_VARIANTS = {"shipped": {}, "batched-reduce": {"batched_reduce": True},
                    "per-column-reduce": {"batched_reduce": False}}


def launcher(w: BatchMLAPagedAttentionWrapper, b, out, lse, variant: dict):
    p = w._plan
    a = p.arrays
    ds_mla = b.kv_cache is not None
    ckv, kpe = (kv_views(KV_FP8_DS_MLA, b.kv_cache, None, None)[:2] if ds_mla
                else (b.ckv_cache, b.kpe_cache))

    plan_kw = {"block_m": p.config.block_m, "schedule": KV_AS_M} if p.config.kv_as_m else {}

    def fn() -> None:
        launch_decode_tilelang(b.q_nope, b.q_pe, ckv, kpe, out, lse, w._part_o, w._part_lse,
                               a.qo_indptr, a.kv_indptr, p.kv_indices, a.kv_len, a.work_req,
                               a.work_kv_begin, a.work_kv_end, a.work_part_row, p.sm_scale, p.causal,
                               p.sizes[4], ds_mla=ds_mla, **plan_kw, **variant)
        if p.sizes[5]:
            launch_merge(part_o=w._part_o, part_lse=w._part_lse, out=out, lse=lse,
                         tok_part_row=a.tok_part_row, tok_num_parts=a.tok_num_parts,
                         tok_part_stride=a.tok_part_stride, config=p.merge_config)
    return fn


def _cycling(fns: list):
    """One callable that steps through the rotations' launchers."""
    it = iter(range(10**9))
    return lambda: fns[next(it) % len(fns)]()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="W2,W3")
    ap.add_argument("--rotations", type=int, default=3)
    every = ",".join(dict.fromkeys([*VARIANTS, *KV_AS_M_VARIANTS]))
    ap.add_argument("--variants", default=every, help="comma list of " + every)
    ap.add_argument("--splits", default="auto,1,2", help="split counts for the shipped variant")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    rows = []
    for name in args.workloads.split(","):
        wl = WORKLOADS[name]
        b = make_device_batch(wl, "cuda", rotations=args.rotations)
        ds_mla = b.kv_cache is not None
        ref = reference(b, torch.float32, dequantised=ds_mla)
        out = torch.empty_like(b.q_nope)
        lse = torch.empty(b.q_nope.shape[:2], dtype=torch.float32, device="cuda")
        split_list = [None if x == "auto" else int(x) for x in args.splits.split(",")]
        for splits in split_list:
            wrappers = []
            for r in range(args.rotations):
                w = BatchMLAPagedAttentionWrapper(torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda"))
                w.plan(*plan_args(b, r), num_splits=splits)
                wrappers.append(w)
            assert wrappers[0].backend == "tilelang", f"{name} did not plan the TileLang path"
            names = args.variants.split(",")
            if wrappers[0]._plan.config.kv_as_m:
                chosen = [(v, KV_AS_M_VARIANTS[v]) for v in names if v in KV_AS_M_VARIANTS]
            else:
                chosen = [(v, VARIANTS[v]) for v in names if v in VARIANTS and (v in FP8_VARIANTS or not ds_mla)]
            for vname, variant in chosen if splits is None else chosen[:1]:
                fns = [launcher(w, b, out, lse, variant) for w in wrappers]
                try:
                    fns[0]()
                    torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 - a variant that fails to build is a data point
                    print(f"  {name} {vname}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    continue
                err = float((out.float() - ref[0].float()).abs().max())
                us = triton.testing.do_bench(_cycling(fns), warmup=50, rep=300, return_mode="median") * 1e3
                tflops = wl.flops() / us / 1e6
                label = f"{vname} splits={splits or 'auto'}"
                rows.append({"workload": name, "variant": label, "us": round(us, 1),
                             "TFLOPs": round(tflops, 1), "max_err_vs_fp32": err,
                             "pieces": wrappers[0].plan_info["pieces"]})
                print(f"  {name} {label:<28} {us:8.1f} us {tflops:6.1f} TFLOP/s err {err:.1e}", flush=True)
        del b
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "bench_tilelang.json").write_text(json.dumps({"provenance": provenance(), "rows": rows},
                                                                indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
