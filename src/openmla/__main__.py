"""``python -m openmla``: a DeepSeek-shaped paged MLA decode on the best device present, checked
against the float64 oracle, with a table of shape, time, GB/s, TFLOP/s and error.

On a GPU: W1 (B64, 16 heads, 4K tokens) and W2 (128 heads) of WORKLOADS.md. Without one: a
small batch through Triton's CPU interpreter (the same kernels, slower by orders of magnitude).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _progress(step: int, total: int, what: str) -> None:
    print(f"[{step}/{total}] {what}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openmla", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="use the CPU interpreter even with a GPU")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.cpu
    if not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported below

    from openmla import BatchMLAPagedAttentionWrapper
    from openmla.reference import mla_decode_reference
    from openmla.testing import assert_attention_close
    from openmla.workloads import WORKLOADS, Workload, make_device_batch, plan_args

    if on_gpu:
        device, workloads = torch.device("cuda"), [WORKLOADS["W1"], WORKLOADS["W2"]]
    else:
        device = torch.device("cpu")
        workloads = [Workload("cpu-small", "DeepSeek-shaped, small (interpreter)", 4, 1, (300, 1024, 77, 640), 16)]
    steps = 3 * len(workloads)
    step = 0
    rows = []
    for w in workloads:
        step += 1
        _progress(step, steps, f"{w.name}: building a paged batch (B={w.batch}, heads={w.num_heads}) on {device}")
        b = make_device_batch(w, device)
        wrapper = BatchMLAPagedAttentionWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=device))
        wrapper.plan(*plan_args(b))
        out = torch.empty_like(b.q_nope)
        lse = torch.empty(b.q_nope.shape[:2], dtype=torch.float32, device=device)

        def run(wrapper=wrapper, b=b, out=out, lse=lse) -> None:
            wrapper.run(b.q_nope, b.q_pe, b.ckv_cache, b.kpe_cache, out=out, lse=lse)

        step += 1
        _progress(step, steps, f"{w.name}: compiling and timing the decode"
                  + ("" if on_gpu else " (the interpreter takes a few seconds)"))
        if on_gpu:
            import triton.testing

            run()
            us = 1e3 * triton.testing.do_bench(run, return_mode="median")
        else:
            t0 = time.perf_counter()
            run()
            us = 1e6 * (time.perf_counter() - t0)
        step += 1
        _progress(step, steps, f"{w.name}: checking against the float64 reference")
        ref_args = (b.q_nope, b.q_pe, b.ckv_cache, b.kpe_cache, b.qo_indptr, b.kv_indptr,
                    b.kv_indices[0], b.kv_len, w.page_size, b.sm_scale, w.causal)
        ref = mla_decode_reference(*ref_args)
        low = mla_decode_reference(*ref_args, compute_dtype=torch.float32)
        try:
            errs = assert_attention_close(out, lse, ref, (low[0].to(out.dtype), low[1]))
            status, err = "ok", errs["out_err"]
        except AssertionError as exc:
            status, err = f"FAIL: {exc}", float("nan")
        rows.append((w, us, err, status))

    print(f"\nopenmla decode on {torch.cuda.get_device_name() if on_gpu else 'CPU (Triton interpreter)'}")
    print(f"{'shape':<44} {'time':>12} {'GB/s':>8} {'TFLOP/s':>8} {'max err':>9}  check")
    for w, us, err, status in rows:
        shape = f"{w.name} B{w.batch} H{w.num_heads} Sq{w.qo_len} kv{max(w.kv_lens)} page{w.page_size}"
        print(f"{shape:<44} {us:>9.1f} us {w.bytes() / us / 1e3:>8.1f} {w.flops() / us / 1e6:>8.2f} "
              f"{err:>9.2e}  {status}")
    return 0 if all(r[3] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
