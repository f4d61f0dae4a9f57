"""The TileLang kernels' generated CUDA, read where a property has no reliable run-time symptom: a
program whose piece has no keys issues no TMA load (TileLang waits on Q's load only inside the KV
loop, so one issued for an empty range would still be in flight when the program exits, and land
in the shared memory of whatever its SM runs next: whether that shows depends on timing). Needs
tilelang and nvcc, not a GPU (``OPENMLA_TILELANG_ARCH=sm_90a`` compiles without one); runs with
the GPU tests."""

from __future__ import annotations

import re

import pytest

from openmla.kernels import decode_tilelang

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not decode_tilelang.tilelang_available(), reason="tilelang is not installed")]

# the condition of the branch that holds the loads: the piece's range is not empty
NON_EMPTY = re.compile(r"if \(.*work_kv_begin\[[^\n]*?\] < work_kv_end\[")


@pytest.mark.parametrize("schedule, heads, causal, block_m, ds_mla, variant", [
    ("kv_as_m", 16, False, 16, False, {}),
    ("kv_as_m", 16, True, 32, False, {}),
    ("kv_as_m", 16, False, 16, True, {}),
    ("auto_ws", 128, True, 64, False, {}),
    ("kv_as_m", 16, False, 16, True, {"converter": True}),
    ("kv_as_m", 16, True, 32, False, {"split_rows": True}),
], ids=["kv_as_m-16rows", "kv_as_m-32rows-causal", "kv_as_m-ds_mla", "auto_ws", "kv_as_m-ds_mla-converter",
        "kv_as_m-32rows-split"])
def test_empty_range_issues_no_tma_load(schedule: str, heads: int, causal: bool, block_m: int,
                                        ds_mla: bool, variant: dict) -> None:
    source = decode_tilelang.build_kernel(heads, 64, "bfloat16", causal, schedule=schedule, block_m=block_m,
                                          ds_mla=ds_mla, **variant).get_kernel_source()
    guard = NON_EMPTY.search(source)
    assert guard is not None, "no branch on the piece's range"
    loads = [m.start() for m in re.finditer(r"tma_load\(", source)]
    assert loads, "no TMA load in the kernel"
    assert all(pos > guard.start() for pos in loads)
