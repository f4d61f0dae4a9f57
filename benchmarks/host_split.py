"""Where the host time of one eager ``run()`` goes on a GPU machine: the whole call, the
TileLang decode launch, the merge launch, and a ``torch`` one-element add (the host's speed: it
differs several-fold between machines and processes).

    python benchmarks/host_split.py [W5,W1]

``sync``: the GPU drained before each call; ``stream``: calls queued back to back. Medians of
250 calls (after 50), microseconds.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from openmla import BatchMLAPagedAttentionWrapper, ops
from openmla.kernels import merge
from openmla.workloads import WORKLOADS, make_device_batch, plan_args

SPANS: dict[str, list[float]] = {}


def _timed(name: str, fn):
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        SPANS.setdefault(name, []).append(time.perf_counter() - t0)
        return result
    return call


def main() -> None:
    ops.launch_decode_tilelang = _timed("tilelang", ops.launch_decode_tilelang)
    merge.PlannedMerge.__call__ = _timed("merge", merge.PlannedMerge.__call__)
    for name in (sys.argv[1] if len(sys.argv) > 1 else "W5,W1").split(","):
        b = make_device_batch(WORKLOADS[name], "cuda")
        w = BatchMLAPagedAttentionWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
        w.plan(*plan_args(b))
        out = torch.empty_like(b.q_nope)
        lse = torch.empty(b.q_nope.shape[:2], dtype=torch.float32, device="cuda")
        x = torch.zeros(16, device="cuda")
        for mode in ("sync", "stream"):
            SPANS.clear()
            for i in range(300):
                if mode == "sync":
                    torch.cuda.synchronize()
                _timed("run", w.run)(b.q_nope, b.q_pe, b.ckv_cache, b.kpe_cache, out=out, lse=lse)
                _timed("x.add_", x.add_)(1)
                if mode == "stream" and i % 16 == 15:
                    torch.cuda.synchronize()
            med = {k: round(statistics.median(v[50:]) * 1e6, 1) for k, v in SPANS.items()}
            print(name, mode, " ".join(f"{k} {v}" for k, v in med.items()), flush=True)
        del b
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
