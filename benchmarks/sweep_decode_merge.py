"""The decode's merge config swept at call level: every ``config.reduce_candidates`` config for
two pieces, each planned through a one-row ``OPENMLA_REDUCE_TABLE`` and timed as the whole decode
call (the partials L2-resident, as the decode leaves them), fa3 and the default plan beside.

    python benchmarks/sweep_decode_merge.py W1h64,W1h32,W1 [seconds]

The default plans of these workloads split every request in two (64 tokens x 2 pieces).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import FlashInfer, Ours, check, kernel_times, references, time_rotating

from openmla import tuning
from openmla.config import ReduceConfig, reduce_candidates
from openmla.tune import table_row, write_table
from openmla.workloads import WORKLOADS, make_device_batch


def one_row_table(cfg: ReduceConfig, tokens: int, heads: int, splits: int) -> str:
    """A reduce table holding ``cfg`` at one point (``OPENMLA_REDUCE_TABLE`` points plan() at it)."""
    path = Path(tempfile.mkdtemp()) / "reduce.csv"
    write_table([table_row({"gpu": "sweep", "sm_count": 0}, (tokens, heads, 512, splits), cfg, 0.0, 0.0)], path)
    return str(path)


def planned_with(b, cfg: ReduceConfig, heads: int) -> Ours:
    os.environ["OPENMLA_REDUCE_TABLE"] = one_row_table(cfg, b.q_nope.shape[0], heads, 2)
    tuning._cuda_config.cache_clear()
    try:
        return Ours(b, 3)
    finally:
        del os.environ["OPENMLA_REDUCE_TABLE"]
        tuning._cuda_config.cache_clear()


def main() -> None:
    names = sys.argv[1].split(",")
    budget_s = float(sys.argv[2]) if len(sys.argv) > 2 else 1e9
    t0 = time.time()
    for name in names:
        b = make_device_batch(WORKLOADS[name], "cuda", rotations=3)
        heads = b.q_nope.shape[1]
        ref, lowp = references(b)
        fa3, base = FlashInfer(b, 3, "fa3"), Ours(b, 3)
        print(name, "plan", {k: base.wrappers[0].plan_info.get(k) for k in ("pieces", "block_m")}, flush=True)
        res = {"fa3": time_rotating(fa3.fns(), rep_ms=150), "default": time_rotating(base.fns(), rep_ms=150)}
        print(name, "fa3", round(res["fa3"], 1), "default", round(res["default"], 1), "kernels",
              kernel_times(base.fns()), flush=True)
        for cfg in reduce_candidates(2, heads, 512):
            if time.time() - t0 > budget_s:
                print("time up")
                break
            impl = planned_with(b, cfg, heads)
            status = check(impl, ref, lowp)
            key = f"{cfg.block_h},{cfg.block_d},{cfg.block_s},{cfg.num_warps},{cfg.num_stages}"
            res[key] = time_rotating(impl.fns(), rep_ms=150)
            print(name, key, round(res[key], 1), status[:12], flush=True)
        res["fa3 again"] = time_rotating(fa3.fns(), rep_ms=150)
        res["default again"] = time_rotating(base.fns(), rep_ms=150)
        best = sorted((v, k) for k, v in res.items() if "," in k)[:5]
        print(name, "SUMMARY", json.dumps({k: round(v, 1) for k, v in res.items() if "," not in k}), "best",
              [(k, round(v, 1)) for v, k in best], flush=True)


if __name__ == "__main__":
    main()
