"""Warp-stall profile of openmla's decode kernel under Nsight Compute, one call a workload.

On the GPU machine, from the repo root, after ``source scripts/gpu_env.sh``:

    python benchmarks/ncu_profile.py --out $OUT W9 W8 'W9:{"_PROBE_DQ8_FAST": "one"}'

runs three warm-up calls of each workload (``NAME`` or ``NAME:{kernel module attributes}``, as
``ab_env.py`` sets them on ``openmla.kernels.decode_tilelang``), then profiles the next call's
``decode_kernel`` with ``ncu --clock-control none`` (the clocks are left alone). It writes
``$OUT/ncu.ncu-rep`` (often too large to fetch), the details page ``ncu_details.txt`` and the
per-instruction source page ``ncu_sass.csv`` (SASS, stall samples, instructions executed).
On any machine:

    python benchmarks/ncu_profile.py --summarize ncu_sass.csv [--region 0x800]

prints each profiled kernel's stall reasons, then its code in regions of ``--region`` bytes (the
regions with at least 0.4% of the samples): the share of samples, the most executed opcodes, the
top stall reasons. In the warp-specialised kernels the producer's barrier waits are part of the
samples; its region is the one of TMA issues (``UTMALDG``) and ``SYNCS`` waits.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

STALLS_MIN_SHARE = 0.004  # regions below this share of a kernel's samples are not printed


def _run_inner(specs: list[str]) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from ab_env import kernel_attrs
    from bench_decode import Ours

    from openmla.workloads import WORKLOADS, make_device_batch

    for spec in specs:
        name, _, attrs = spec.partition(":")
        with kernel_attrs(json.loads(attrs) if attrs else {}):
            batch = make_device_batch(WORKLOADS[name], "cuda", rotations=1)
            call = Ours(batch, 1).fns()[0]
            for _ in range(3):
                call()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            call()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
        print(f"profiled {spec}", flush=True)


def _profile(specs: list[str], out: Path) -> None:
    ncu = shutil.which("ncu")
    if ncu is None:
        sys.exit("ncu is not on the PATH")
    out.mkdir(parents=True, exist_ok=True)
    rep = out / "ncu.ncu-rep"
    sections = ["SpeedOfLight", "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "SchedulerStats",
                "WarpStateStats", "InstructionStats", "LaunchStats", "Occupancy", "SourceCounters"]
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "-k", "regex:decode_kernel",
           *[a for s in sections for a in ("--section", s)], "-o", str(rep.with_suffix("")), "-f",
           sys.executable, __file__, "--inner", *specs]
    subprocess.run(cmd, check=True)
    with open(out / "ncu_details.txt", "w") as f:
        subprocess.run([ncu, "-i", str(rep), "--page", "details"], stdout=f, check=True)
    with open(out / "ncu_sass.csv", "w") as f:
        subprocess.run([ncu, "-i", str(rep), "--page", "source", "--csv", "--print-source", "sass"],
                       stdout=f, check=True)


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read_source_page(path: Path) -> list[tuple[list[str], list[list[str]]]]:
    """The source page's kernels, each as (header, instruction rows)."""
    kernels: list[tuple[list[str], list[list[str]]]] = []
    with open(path) as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                kernels.append(([], []))
            elif row[0] == "Address":
                kernels[-1] = (row, kernels[-1][1])
            elif kernels:
                kernels[-1][1].append(row)
    return kernels


def summarize(path: Path, region: int) -> None:
    for n, (header, rows) in enumerate(read_source_page(path)):
        col = {name: i for i, name in enumerate(header)}
        stalls = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
        samples = col["Warp Stall Sampling (All Samples)"]
        total = sum(_number(r[samples]) for r in rows) or 1.0
        reasons = collections.Counter()
        regions: dict[int, dict] = {}
        for r in rows:
            reasons.update({s[6:]: _number(r[col[s]]) for s in stalls})
            at = (int(r[col["Address"]], 16) & 0xFFFFF) // region * region
            reg = regions.setdefault(at, {"samples": 0.0, "ops": collections.Counter(),
                                          "stalls": collections.Counter()})
            reg["samples"] += _number(r[samples])
            source = r[col["Source"]].split()
            op = source[1] if source and source[0].startswith("@") and len(source) > 1 else source[0]
            reg["ops"][op.split(".")[0]] += _number(r[col["Instructions Executed"]])
            reg["stalls"].update({s[6:]: _number(r[col[s]]) for s in stalls})
        print(f"kernel {n}: {total:.0f} samples, {len(rows)} instructions; stalls "
              + " ".join(f"{k}={v / total:.1%}" for k, v in reasons.most_common(8)))
        for at, reg in sorted(regions.items()):
            if reg["samples"] / total < STALLS_MIN_SHARE:
                continue
            ops = " ".join(f"{o}" for o, _ in reg["ops"].most_common(5))
            top = " ".join(f"{k}={v / reg['samples']:.0%}" for k, v in reg["stalls"].most_common(3))
            print(f"  {at:05x} {reg['samples'] / total:6.1%}  {ops:40s} | {top}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", nargs="*", help="workloads, NAME or NAME:{attributes as JSON}")
    p.add_argument("--out", type=Path, default=Path("gpu_out"))
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--summarize", type=Path, help="a source page written by a profiling run")
    p.add_argument("--region", type=lambda s: int(s, 0), default=0x800, help="bytes of code a region")
    a = p.parse_args()
    if a.summarize:
        summarize(a.summarize, a.region)
    elif a.inner:
        _run_inner(a.specs)
    else:
        _profile(a.specs, a.out)


if __name__ == "__main__":
    main()
