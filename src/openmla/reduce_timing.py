"""What the reduce tuner and the reduce micro-benchmark share: rotated partial sets, the plain
torch merge and its float64 reference, byte counts, timing and provenance."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

LOG2E = 1.4426950408889634
ROTATION_BYTES = 2 * 50 << 20  # inputs a timed graph steps through: two H100 L2s
MAX_ROTATIONS = 1024


def rotations_for(num_bytes: int, device: torch.device) -> int:
    """How many copies of ``num_bytes`` of inputs make a timed graph read past twice the L2."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    target = max(ROTATION_BYTES, 2 * l2)
    return max(1, min(MAX_ROTATIONS, -(-target // max(num_bytes, 1))))


def make_partials(splits: int, tokens: int, heads: int, d: int, rotations: int, device: torch.device,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotations`` independent ``[S, T, H, D]`` / ``[S, T, H]`` fp32 partial sets (one tensor each,
    rotation first). Split 0 is empty (``lse = -inf``, ``o = 0``) for every fifth head, as a
    short request's first split would be; no row is empty in every split."""
    gen = torch.Generator(device=device).manual_seed(seed)
    part_o = torch.randn(rotations, splits, tokens, heads, d, device=device, generator=gen)
    part_lse = torch.randn(rotations, splits, tokens, heads, device=device, generator=gen) * 2
    if splits > 1:
        part_lse[:, 0, :, ::5] = float("-inf")
        part_o[:, 0, :, ::5] = 0.0
    return part_o, part_lse


def torch_merge(part_o: torch.Tensor, part_lse: torch.Tensor, out_dtype: torch.dtype,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain torch merge (max, exp, weighted sum) of ``[S, T, H, D]`` partials; it gives NaN
    for rows empty in every split, which the benchmark inputs do not have."""
    m = part_lse.amax(0)
    w = torch.exp(part_lse - m)
    s = w.sum(0)
    out = (w.unsqueeze(-1) * part_o).sum(0) / s.unsqueeze(-1)
    return out.to(out_dtype), m + torch.log(s)


def reference_merge(part_o: torch.Tensor, part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 merge, empty rows as 0 / -inf: what every timed variant is checked against."""
    lse = torch.logsumexp(part_lse.double(), 0)
    w = torch.exp(part_lse.double() - torch.where(torch.isneginf(lse), 0.0, lse))
    return (w.unsqueeze(-1) * part_o.double()).sum(0), lse


def check_merge(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor, ref_lse: torch.Tensor,
                partial_rounding: float = 0.0) -> None:
    """Raises AssertionError unless ``out`` is within the rounding of its dtype of the reference,
    plus ``partial_rounding`` (absolute: the largest rounding error of 16-bit partials, which the
    weighted mean keeps), and ``lse`` within fp32 arithmetic."""
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "NaN in the merge"
    eps = torch.finfo(out.dtype).eps
    atol = eps * ref_out.abs().amax().item() / 64 + partial_rounding
    torch.testing.assert_close(out.double(), ref_out, rtol=eps, atol=atol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def merge_bytes(splits: int, tokens: int, heads: int, d: int, partial_bytes: int = 4, out_bytes: int = 2,
                ) -> int:
    """Bytes a merge moves: partials and their LSEs read, output and LSE written."""
    rows = tokens * heads
    return splits * rows * (d * partial_bytes + 4) + rows * (d * out_bytes + 4)


def time_us(fns: list[Callable[[], object]], min_calls: int = 20, replays: int = 9) -> float:
    """Microseconds one call of ``fns`` takes, launch overhead excluded: ``n = max(min_calls,
    len(fns))`` calls (cycling through ``fns``, one per input copy) are captured in a CUDA graph,
    the graph is replayed ``replays`` times, each replay timed with CUDA events; the median
    replay over ``n``. Host-side Python (argument checks, launchers) runs once, at capture, so
    kernels of a few microseconds are timed back to back as a decode step's graph runs them.
    Raises when the calls cannot be captured (see :func:`time_us_stream`)."""
    n = max(min_calls, len(fns))
    for fn in fns[:2]:  # compile, allocate, load modules outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            fns[i % len(fns)]()
    try:
        graph.replay()  # warm: clocks up, graph uploaded
        graph.replay()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(replays)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        times = sorted(start.elapsed_time(end) for start, end in events)
    finally:
        del graph
    return 1e3 * times[len(times) // 2] / n


def time_us_stream(fns: list[Callable[[], object]], min_calls: int = 20, replays: int = 9) -> float:
    """:func:`time_us` without the graph: the same ``n`` calls launched from Python between two
    events, median of ``replays``. Host overhead counts where it exceeds the kernel's time; used
    for what cannot be captured, and to check :func:`time_us` on large kernels."""
    n = max(min_calls, len(fns))
    for fn in fns[:2]:
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(n):
            fns[i % len(fns)]()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return 1e3 * times[len(times) // 2] / n


def cuda_state() -> str:
    """``"ok"``; ``"cleared"``: a launch error (say, a peer library's failed launch whose error it
    did not consume) was pending, raised by a probe launch and is gone; ``"sticky"``: the CUDA
    context is broken (illegal address, ...) and nothing more can run in this process."""
    for attempt in range(2):
        try:
            torch.cuda.synchronize()
            torch.ones(1, device="cuda").add_(1)  # a launch: torch checks the last error after it
            torch.cuda.synchronize()
            return "ok" if attempt == 0 else "cleared"
        except RuntimeError:
            continue
    return "sticky"


def copy_gbps(num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read plus written) under :func:`time_us`: the
    memory ceiling the merges are held against."""
    src = torch.empty(num_bytes // 4, device="cuda").uniform_()
    dst = torch.empty_like(src)
    us = time_us([lambda: dst.copy_(src)], min_calls=10)
    return 2 * num_bytes / us / 1e3


def git_commit() -> str:
    if os.environ.get("OPENMLA_COMMIT"):
        return os.environ["OPENMLA_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent, stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001 - no git, not a checkout: provenance says so
        return "unknown"


def provenance(command: str | None = None) -> dict[str, str]:
    import triton

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu": props.name,
        "sm_count": str(props.multi_processor_count),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
