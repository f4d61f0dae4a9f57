"""One workload under several settings in one process, FlashInfer fa3 beside: the same-process
A/B of an environment pin or a plan keyword (absolute times drift between processes).

    python benchmarks/ab_env.py W5 '[["default", {}, {}],
                                     ["rows16", {"OPENMLA_KV_AS_M_BLOCK_M": "16"}, {}],
                                     ["det", {}, {"deterministic": true}], ["fa3", {}, {}]]'

    python benchmarks/ab_env.py W5 '[["batched", {}, {}],
                                     ["per-column", {}, {}, {"KV_AS_M_BATCHED_REDUCE": false}]]'

Each variant is ``[label, env, plan keywords]`` or ``[label, env, plan keywords, kernel module
attributes]``; the env is set while the variant plans (plan() reads the pins) and restored after;
the attributes of ``openmla.kernels.decode_tilelang`` (defaults read at launch) are set around
everything the variant does; the label ``fa3`` is FlashInfer. Every variant is checked against
the float64 oracle, then timed three times in turn (rotated page tables, L2 flushed); the first
round adds the CUDA-graph replay time, the kernels (profiler) and the plan's shape. fp8 workloads
are checked against the oracle on the dequantised cache (FlashInfer reads the bf16 cache there).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import FlashInfer, Ours, captured, check, kernel_times, references, time_rotating

from openmla.kernels import decode_tilelang
from openmla.workloads import WORKLOADS, make_device_batch

PLAN_KEYS = ("pieces", "split_requests", "row_blocks", "block_m")


def build(b, label: str, env: dict, plan_kw: dict):
    with mock.patch.dict(os.environ, env):
        return FlashInfer(b, 3, "fa3") if label == "fa3" else Ours(b, 3, **plan_kw)


def kernel_attrs(attrs: dict):
    return mock.patch.multiple(decode_tilelang, **attrs) if attrs else contextlib.nullcontext()


def main() -> None:
    name, variants = sys.argv[1], json.loads(sys.argv[2])
    w = WORKLOADS[name]
    b = make_device_batch(w, "cuda", rotations=3)
    refs = {False: references(b)}
    if b.kv_cache is not None:
        refs[True] = references(b, dequantised=True)
    impls = []
    for label, env, plan_kw, *attrs in variants:
        attrs = attrs[0] if attrs else {}
        try:
            with kernel_attrs(attrs):
                impl = build(b, label, env, plan_kw)
                status = check(impl, *refs[label != "fa3" and b.kv_cache is not None])
                impls.append((label, impl, attrs, status, captured(impl.fns())))
        except Exception as exc:  # noqa: BLE001 - a setting that cannot plan is a data point
            print(name, label, "ERR", type(exc).__name__, str(exc)[:300], flush=True)
    for rnd in range(3):
        for label, impl, attrs, status, replays in impls:
            with kernel_attrs(attrs):
                us = time_rotating(impl.fns())
                graph_us = round(time_rotating(replays), 1) if replays else None
                extra = ""
                if rnd == 0:
                    info = impl.wrappers[0].plan_info if label != "fa3" else {}
                    extra = f"kernels {kernel_times(impl.fns())} plan { {k: info.get(k) for k in PLAN_KEYS} }"
            print(f"{name} r{rnd} {label:<28} {us:8.1f} us {w.bytes() / us / 1e3:6.0f} GB/s graph {graph_us} us "
                  f"{status[:40]} {extra}", flush=True)


if __name__ == "__main__":
    main()
