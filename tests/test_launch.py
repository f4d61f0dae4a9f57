"""The direct Triton launch path (``openmla.kernels.launch``): its cache key separates every
specialisation the JIT makes, and launches that reuse a recorded kernel give the JIT's results,
also when a later call's tensors differ in alignment or stride from the recorded one."""

from __future__ import annotations

import pytest
import torch

from openmla import BatchMLAPagedAttentionWrapper
from openmla.kernels import launch as fast
from openmla.testing import assert_attention_close, make_paged_case, nan_like, run_and_check


def _dummy_kernel() -> None: ...


def test_key_separates_alignment_dtype_and_values() -> None:
    buf = torch.zeros(64, dtype=torch.float32)
    key = fast._key(_dummy_kernel, 0, (buf[0:], 3), {"BLOCK": 16})
    assert key == fast._key(_dummy_kernel, 0, (buf[4:], 3), {"BLOCK": 16})  # 16 bytes further: same
    assert key != fast._key(_dummy_kernel, 0, (buf[1:], 3), {"BLOCK": 16})  # 4-byte aligned only
    assert key != fast._key(_dummy_kernel, 0, (buf.to(torch.float16), 3), {"BLOCK": 16})
    assert key != fast._key(_dummy_kernel, 0, (buf, 1), {"BLOCK": 16})  # ints specialise on 1 and % 16
    assert key != fast._key(_dummy_kernel, 0, (buf, 3), {"BLOCK": 32})


@pytest.mark.gpu
@pytest.mark.parametrize("heads, page, splits", [(16, 64, None), (16, 16, 24), (8, 1, 4)])
def test_recorded_launch_matches_reference(heads: int, page: int, splits: int | None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENMLA_DECODE_BACKEND", "triton")
    fast.clear()
    cuda = torch.device("cuda")
    wrapper = BatchMLAPagedAttentionWrapper(torch.empty(64 << 20, dtype=torch.uint8, device=cuda))
    for seed in range(3):  # the first call records; the others take the direct path
        case = make_paged_case([700, 0, 129, 2048], heads, page, device=cuda, seed=seed)
        run_and_check(wrapper, case, splits)
    assert fast._CACHE, "no launch was recorded"
    # queries at an odd element offset (2-byte aligned) and output rows at a wider stride:
    # another specialisation, compiled and recorded beside the first
    wide = torch.full((case.q_nope.shape[0], heads, 512 + 8), float("nan"), dtype=torch.bfloat16, device=cuda)
    q_nope = wide[:, :, 1:513]
    q_nope.copy_(case.q_nope)
    out_buf = nan_like(wide)
    out = out_buf[:, :, :512]
    lse = torch.full(case.q_nope.shape[:2], float("nan"), device=cuda)
    wrapper.run(q_nope, case.q_pe, case.ckv_cache, case.kpe_cache, out=out, lse=lse, return_lse=True)
    torch.cuda.synchronize()
    assert_attention_close(out, lse, case.reference(), case.lowp_reference())


@pytest.mark.gpu
def test_every_format_records_a_direct_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """16-bit, per-tensor fp8 and 656-byte rows on the Triton kernel, split and merged: after a
    first call, every launch (decode and merge) takes the direct path, none the JIT's."""
    from openmla.testing import to_fp8_ds_mla, to_fp8_per_tensor

    monkeypatch.setenv("OPENMLA_DECODE_BACKEND", "triton")
    fast.clear()
    cuda = torch.device("cuda")
    wrapper = BatchMLAPagedAttentionWrapper(torch.empty(64 << 20, dtype=torch.uint8, device=cuda))
    case = make_paged_case([3000, 5, 700], 16, 64, device=cuda, seed=5)
    kv8, _ = to_fp8_ds_mla(case)
    ckv8, kpe8, _ = to_fp8_per_tensor(case, 0.02)
    runs = [(case.ckv_cache.dtype, (case.ckv_cache, case.kpe_cache), {}), (torch.uint8, (kv8, None), {}),
            (torch.float8_e4m3fn, (ckv8, kpe8), {"kv_scale": 0.02})]
    for kv_dtype, caches, kw in runs:
        args = list(case.plan_args())
        args[-1] = kv_dtype
        wrapper.plan(*args, num_splits=20)  # 20 pieces: the merge kernel too
        for _ in range(2):
            wrapper.run(case.q_nope, case.q_pe, *caches, **kw)
    torch.cuda.synchronize()
    assert fast._CACHE and fast.slow_paths() == 0


def test_planned_merge_direct_launch_passes_the_generic_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode's merge bound to its plan: after a first launch through the generic path it
    launches the recorded kernel with exactly the arguments the generic path builds, and goes
    back to the generic path when ``out``/``lse`` differ in dtype, alignment or stride."""
    from openmla.config import ReduceConfig
    from openmla.kernels import merge

    calls = []
    recorded_hit = ("kernel", ("tail",))
    monkeypatch.setattr(merge, "launch",
                        lambda fn, grid, args, kwargs: calls.append(("generic", grid, args, kwargs)) or recorded_hit)
    monkeypatch.setattr(merge, "run_recorded", lambda hit, grid, dev, args: calls.append(("direct", grid, args, hit)))
    monkeypatch.setattr(merge, "hooks_set", lambda: False)
    tokens, heads, d = 3, 5, 64
    part_o, part_lse = torch.zeros(40, d), torch.zeros(40)
    tok = tuple(torch.zeros(tokens, dtype=torch.int32) for _ in range(3))
    config = ReduceConfig(1, 32, 4, 1, 1, ordered=True)
    planned = merge.PlannedMerge(part_o, part_lse, tok, tokens, config)
    out, lse = torch.zeros(tokens, heads, d, dtype=torch.bfloat16), torch.zeros(tokens, heads)
    planned(out, lse)
    planned(out, lse)
    out2 = torch.zeros(tokens, heads, d, dtype=torch.bfloat16)  # another tensor, same layout
    planned(out2, lse)
    wide = torch.zeros(tokens, heads, d + 16, dtype=torch.bfloat16)[..., :d]  # another row stride
    planned(wide, lse)
    assert [c[0] for c in calls] == ["generic", "direct", "direct", "generic"]
    generic = merge._launch_args(part_o, part_lse, out2, lse, tok, tokens, 0, config, False)
    assert calls[2][1] == (generic[0],) and calls[2][3] is recorded_hit
    assert len(calls[2][2]) == len(generic[1])
    assert all(a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(calls[2][2], generic[1]))
    assert calls[3][2][2] is wide and calls[3][2][11] == d + 16  # the head stride
