"""Repeat the phases of ``bench_decode.py`` in which the batched ``kv_as_m`` reductions stalled in
session 13 (a workload's eager timing and its CUDA-graph capture and replays, batch-invariant
plan by default) under a watchdog, to count stalls instead of meeting one by chance:

    OPENMLA_KV_AS_M_BATCHED_REDUCE=1 python benchmarks/stall_probe.py W5 --seconds 240 --stall 60

Each round times eager calls (L2 flushed, page tables rotated, as ``bench_decode`` does), then
captures the calls as CUDA graphs and times their replays. A round still running ``--stall``
seconds after it began dumps every thread's stack once (faulthandler, armed per round: periodic
dumps while Python runs crashed processes in session 14) and the process exits with status 1.
On a fresh machine run FlashInfer's W5 once first (``bench_decode.py --workloads W5``): its first
use compiles a module for ~20 s, which is not a stall.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import Ours, captured, check, references, time_rotating

from openmla.kernels import decode_tilelang
from openmla.workloads import WORKLOADS, make_device_batch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload", choices=sorted(WORKLOADS))
    p.add_argument("--plan", choices=("deterministic", "default"), default="deterministic")
    p.add_argument("--seconds", type=float, default=240, help="stop starting rounds after this long")
    p.add_argument("--stall", type=float, default=60, help="a round running this long is a stall")
    a = p.parse_args()

    w = WORKLOADS[a.workload]
    b = make_device_batch(w, "cuda", rotations=3)
    impl = Ours(b, 3, deterministic=a.plan == "deterministic")
    status = check(impl, *references(b, dequantised=b.kv_cache is not None))
    print(f"{a.workload} {a.plan} plan, batched reductions {decode_tilelang.KV_AS_M_BATCHED_REDUCE}, "
          f"{impl.wrappers[0].plan_info.get('pieces')} pieces: {status}", flush=True)
    t0 = time.time()
    rounds = 0
    while time.time() - t0 < a.seconds:
        faulthandler.dump_traceback_later(a.stall, exit=True)
        eager_us = time_rotating(impl.fns())
        replays = captured(impl.fns())
        graph_us = time_rotating(replays) if replays else float("nan")
        faulthandler.cancel_dump_traceback_later()
        rounds += 1
        print(f"round {rounds}: eager {eager_us:.1f} us, graph {graph_us:.1f} us, "
              f"{time.time() - t0:.0f} s", flush=True)
    print(f"{rounds} rounds, no stall", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
