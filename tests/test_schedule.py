"""The automatic split schedule on its own (host-side, no kernels): pieces fit one wave of the
target, the chunk is the smallest that does, and every token is covered exactly once."""

from __future__ import annotations

import itertools
import random

import pytest

from openmla.config import DEFAULT_SCHEDULE
from openmla.schedule import _fit_chunk, _target_pieces, build_schedule, cdiv

SMS = 132


def _plan(kv_lens: list[int], heads: int = 16, block_n: int = 32):
    return build_schedule([1] * len(kv_lens), kv_lens, heads, block_n, 1, SMS, 10**9, 10**5, 10**5)


def _pieces(sched) -> list[tuple[int, int, int]]:
    return [(r, b, e) for r, b, e in zip(sched.work_req, sched.work_kv_begin, sched.work_kv_end) if r >= 0]


@pytest.mark.parametrize("kv_lens", [
    [131072] + [1024] * 31,  # W7: cut at 640, 267 pieces for 264 slots (a trailing wave of stubs)
    [8192] * 64,  # W8 shape: cut at 2016, 320 pieces
    [4096] * 128,  # W6 shape: cut at 2016, 384 pieces
    [4096] * 64,  # W1
    [65536] * 8,  # W4
])
def test_pieces_fit_one_wave_with_the_smallest_chunk(kv_lens: list[int]) -> None:
    target = _target_pieces(SMS, 1, DEFAULT_SCHEDULE)
    sched = _plan(kv_lens)
    pieces = _pieces(sched)
    assert len(pieces) <= target
    longest = max(e - b for _, b, e in pieces)
    # one block_n less would need more pieces than the wave holds (or go below the floor)
    smaller = longest - 32
    floor = max(DEFAULT_SCHEDULE.min_chunk, cdiv(sum(kv_lens), target))
    assert smaller < floor or sum(cdiv(n, smaller) for n in kv_lens) > target


def test_every_token_is_covered_once() -> None:
    rng = random.Random(7)
    for _ in range(50):
        kv_lens = [rng.choice([0, 1, 31, 300, 1024, 5000, 70000]) for _ in range(rng.randint(1, 40))]
        sched = _plan(kv_lens)
        covered: dict[int, list[tuple[int, int]]] = {}
        for r, b, e in _pieces(sched):
            assert b % 32 == 0 and b < e or (b == e == 0 and kv_lens[r] == 0)
            covered.setdefault(r, []).append((b, e))
        for r, n in enumerate(kv_lens):
            spans = sorted(covered[r])
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def test_fit_chunk_is_monotone_search() -> None:
    lens = [131072] + [1024] * 31
    assert _fit_chunk(lens, 264, 32, 617) == 672
    assert _fit_chunk(lens, 10**6, 32, 1) == 32  # any chunk fits: the floor
    assert _fit_chunk([100], 1, 32, 1) == 128  # one piece: the request rounded up to block_n


def test_kv_as_m_plans_one_wave_and_2048_token_invariant_pieces() -> None:
    """The kv_as_m kernel holds an SM alone: one wave of pieces (W1: 2 a request, 128 for 132
    SMs) and, in batch-invariant mode, pieces of 2048 tokens at 16 heads."""
    from openmla.schedule import KV_AS_M_SCHEDULE, deterministic_pieces

    sched = build_schedule([1] * 64, [4096] * 64, 16, 64, 1, SMS, 10**9, 10**5, 10**5, sched=KV_AS_M_SCHEDULE)
    assert sched.num_pieces == 128
    det = build_schedule([1] * 3, [5000, 2048, 1], 16, 64, 1, SMS, 10**9, 10**5, 10**5,
                         sched=KV_AS_M_SCHEDULE, deterministic=True)
    assert sorted(_pieces(det)) == [(0, 0, 2048), (0, 2048, 4096), (0, 4096, 5000), (1, 0, 2048), (2, 0, 1)]
    assert deterministic_pieces([1, 1, 1], [5000, 2048, 1], 16, SMS, 64, KV_AS_M_SCHEDULE) == 5
    assert deterministic_pieces([1, 1, 1], [5000, 2048, 1], 16, SMS, 64) == 8  # 1024-token pieces elsewhere


def test_batch_invariant_long_request_fills_three_quarters_of_the_sms() -> None:
    """Batch-invariant mode: a request longer than 32 chunks is cut into pieces for 3/4 of the
    SMs (W7's 128K request: 98 pieces of 1344 tokens, its 31 short requests on the SMs left),
    the same alone as in any batch; up to 32 chunks (W4's 64K) the chunk stays."""
    from openmla.schedule import KV_AS_M_SCHEDULE, deterministic_pieces, deterministic_request_chunk

    assert deterministic_request_chunk(131072, 2048, SMS, 64) == 1344
    assert deterministic_request_chunk(65536, 2048, SMS, 64) == 2048
    assert deterministic_request_chunk(10**6, 2048, SMS, 64) == 2048  # never longer than the chunk
    w7 = [131072] + [1024] * 31
    crowd = build_schedule([1] * 32, w7, 16, 64, 1, SMS, 10**9, 10**5, 10**5, sched=KV_AS_M_SCHEDULE,
                           deterministic=True)
    alone = build_schedule([1], w7[:1], 16, 64, 1, SMS, 10**9, 10**5, 10**5, sched=KV_AS_M_SCHEDULE,
                           deterministic=True)
    assert crowd.num_pieces == 98 + 31 <= SMS
    assert sorted(p[1:] for p in _pieces(crowd) if p[0] == 0) == sorted(p[1:] for p in _pieces(alone))
    assert deterministic_pieces([1] * 32, w7, 16, SMS, 64, KV_AS_M_SCHEDULE) == crowd.num_pieces


def test_kv_as_m_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below 64 heads, 16-bit caches and 656-byte rows take the kv_as_m kernel (16- or 32-row
    tiles, by the batch's largest request); 64+ heads keep the 64-row kernel. The variable pins
    the choice: kv_as_m for every plan, a 64-row schedule's name for none."""
    from openmla.kernels.decode_tilelang import PLAN_CONFIG, plan_config, uses_kv_as_m

    monkeypatch.delenv("OPENMLA_TILELANG_SCHEDULE", raising=False)
    monkeypatch.delenv("OPENMLA_KV_AS_M_BLOCK_M", raising=False)
    assert uses_kv_as_m(1, "plain") and uses_kv_as_m(63, "plain")
    assert uses_kv_as_m(16, "ds_mla") and uses_kv_as_m(9, "ds_mla")
    assert not uses_kv_as_m(64, "plain") and not uses_kv_as_m(64, "ds_mla") and not uses_kv_as_m(16, None)
    assert plan_config(16, 16, "plain").kv_as_m and plan_config(16, 16, "plain").block_m == 16
    assert plan_config(16, 32, "plain").block_m == 32 and plan_config(24, 72, "plain").block_m == 32
    assert plan_config(16, 16, "ds_mla").kv_as_m and plan_config(16, 32, "ds_mla").block_m == 32
    assert plan_config(128, 256, "plain") == PLAN_CONFIG and plan_config(128, 256, "ds_mla") == PLAN_CONFIG
    monkeypatch.setenv("OPENMLA_KV_AS_M_BLOCK_M", "16")  # pins the tile rows (A/B runs)
    assert plan_config(16, 32, "plain").block_m == 16 and plan_config(128, 256, "plain") == PLAN_CONFIG
    monkeypatch.setenv("OPENMLA_KV_AS_M_BLOCK_M", "24")
    with pytest.raises(ValueError, match="OPENMLA_KV_AS_M_BLOCK_M"):
        plan_config(16, 16, "plain")
    monkeypatch.delenv("OPENMLA_KV_AS_M_BLOCK_M")
    monkeypatch.setenv("OPENMLA_TILELANG_SCHEDULE", "kv_as_m")
    assert plan_config(128, 128, "plain").kv_as_m and uses_kv_as_m(128, "ds_mla")
    monkeypatch.setenv("OPENMLA_TILELANG_SCHEDULE", "seesaw")
    assert not uses_kv_as_m(16, "plain") and plan_config(16, 16, "ds_mla") == PLAN_CONFIG


def test_kv_as_m_batched_reduce_pin() -> None:
    """``OPENMLA_KV_AS_M_BATCHED_REDUCE`` (read at import) turns kv_as_m's batched reductions off
    for A/B runs (``0``); unset they stay on, and another value is refused by name."""
    from openmla.kernels.decode_tilelang import _batched_reduce_pin

    assert _batched_reduce_pin(None) is True and _batched_reduce_pin("") is True
    assert _batched_reduce_pin("0") is False and _batched_reduce_pin("1") is True
    for bad in ("2", "true", " 1"):
        with pytest.raises(ValueError, match="OPENMLA_KV_AS_M_BATCHED_REDUCE"):
            _batched_reduce_pin(bad)
