"""The standalone LSE-reduce: launch configs, the tuning table, the reduce-map form of
merge_states and the tuner, on small shapes (CPU, interpreter) and, marked ``gpu``, at the
micro-benchmark's shapes."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from openmla import ReduceMap, merge_states
from openmla.config import ReduceConfig, reduce_candidates, untuned_reduce_config
from openmla.reduce_timing import check_merge, make_partials, reference_merge
from openmla.testing import nan_like
from openmla.tune import BENCH_FIXED_SPLITS, grid_points, table_row, tune_point, write_table
from openmla.tuning import (
    DECODE_MERGE_TWO_PIECES,
    TABLE_DIR,
    adaptive_num_splits,
    choose_reduce_config,
    gpu_slug,
    heuristic_reduce_config,
    interpreter_reduce_config,
    load_reduce_table,
    lookup,
    reduce_config,
)

D = 512


def _partials(splits: int, tokens: int, heads: int, d: int = D, seed: int = 0,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random partials with empty splits (lse -inf, o NaN: an empty split's o must never be read
    into the sum) and a row empty in every split (token 0, head 1)."""
    gen = torch.Generator().manual_seed(seed)
    part_o = torch.randn(splits, tokens, heads, d, generator=gen)
    part_lse = torch.randn(splits, tokens, heads, generator=gen) * 3
    part_lse[0, :, ::2] = float("-inf")
    part_o[0, :, ::2] = float("nan")
    part_lse[:, 0, 1] = float("-inf")
    part_o[:, 0, 1] = float("nan")
    return part_o, part_lse


def _check(out: torch.Tensor, lse: torch.Tensor, part_o: torch.Tensor, part_lse: torch.Tensor) -> None:
    ref_out, ref_lse = reference_merge(torch.nan_to_num(part_o), part_lse)
    empty = torch.isneginf(ref_lse)
    out, lse = out.cpu(), lse.cpu()
    assert torch.equal(torch.isneginf(lse), empty)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    check_merge(out, torch.where(empty, 0.0, lse), ref_out, torch.where(empty, 0.0, ref_lse))


# --------------------------------------------------------------------------------------------
# Every config the tuner, the heuristic or the interpreter can pick merges correctly.
# --------------------------------------------------------------------------------------------

def _shipped_configs() -> list[ReduceConfig]:
    """Every config a shipped tuning table holds."""
    return sorted({c for path in TABLE_DIR.glob("reduce_*.csv") for c in load_reduce_table(path).values()},
                  key=lambda c: (c.block_h, c.block_d, c.block_s, c.num_warps, c.num_stages))


HEURISTIC = [heuristic_reduce_config(4, h, D, s) for h in (16, 128) for s in (1, 2, 3, 5, 9, 17, 33)]
PICKABLE = list(dict.fromkeys([
    untuned_reduce_config(D), *_shipped_configs(), *HEURISTIC, DECODE_MERGE_TWO_PIECES,
    *reduce_candidates(5, 5, D)[::4], *reduce_candidates(17, 5, D)[::4],  # a sample of the tuner's space
    interpreter_reduce_config(5, D, 5),
]))


def _cfg_id(cfg: ReduceConfig) -> str:
    return f"h{cfg.block_h}d{cfg.block_d}s{cfg.block_s}w{cfg.num_warps}st{cfg.num_stages}"


@pytest.mark.parametrize("cfg", PICKABLE, ids=_cfg_id)
def test_every_pickable_config_merges_correctly(cfg: ReduceConfig, device: torch.device) -> None:
    part_o, part_lse = _partials(splits=5, tokens=2, heads=5)  # 5 heads: no head block divides it
    out, lse = merge_states(part_o.to(device), part_lse.to(device), config=cfg)
    _check(out, lse, part_o, part_lse)


@pytest.mark.parametrize("splits", [1, 2, 33])
@pytest.mark.parametrize("cfg", [untuned_reduce_config(D), ReduceConfig(8, 256, 2, 8, 1), ReduceConfig(1, 128, 8, 4, 3)],
                         ids=_cfg_id)
def test_split_counts_across_steps(splits: int, cfg: ReduceConfig, device: torch.device) -> None:
    """One split (a copy), and more splits than any step holds (the running max rescales)."""
    part_o, part_lse = _partials(splits=splits, tokens=2, heads=3, seed=splits)
    if splits == 1:  # nothing to fall back on: only the all-empty row stays empty
        part_lse[0, :, ::2], part_o[0, :, ::2] = 0.5, 1.0
    out, lse = merge_states(part_o.to(device), part_lse.to(device), out_dtype=torch.float16, config=cfg)
    assert out.dtype == torch.float16
    _check(out, lse, part_o, part_lse)


# --------------------------------------------------------------------------------------------
# The reduce-map form (partials laid out as the decode lays them out).
# --------------------------------------------------------------------------------------------


def _decode_layout(heads: int, seed: int = 0):
    """Flat partials of three requests as the decode writes them: request 0 has 2 query tokens
    and 3 pieces, request 1 one token written directly by the decode (0 pieces), request 2 one
    token and 20 pieces. Returns the flat partials, the map arrays and each token's dense
    ``[S, H, D]`` / ``[S, H]`` partials (None for the skipped token)."""
    gen = torch.Generator().manual_seed(seed)
    requests = [(2, 3), (1, 0), (1, 20)]  # (query tokens, pieces)
    rows = 7 + sum(q * s * heads for q, s in requests)  # 7 unused rows first
    flat_o = torch.randn(rows, D, generator=gen)
    flat_lse = torch.randn(rows, generator=gen) * 3
    flat_lse[7 + heads], flat_o[7 + heads] = float("-inf"), float("nan")  # request 0, token 1, head 0, piece 0
    part_row, num_parts, part_stride, dense = [], [], [], []
    base = 7
    for qo_len, pieces in requests:
        for i in range(qo_len):
            part_row.append(base + i * heads if pieces else -1)
            num_parts.append(pieces)
            part_stride.append(qo_len * heads if pieces else 0)
            idx = torch.tensor([[base + i * heads + j * qo_len * heads + h for h in range(heads)]
                                for j in range(pieces)], dtype=torch.long)
            dense.append((flat_o[idx], flat_lse[idx]) if pieces else None)
        base += qo_len * pieces * heads
    arrays = [torch.tensor(a, dtype=torch.int32) for a in (part_row, num_parts, part_stride)]
    return flat_o, flat_lse, arrays, dense


@pytest.mark.parametrize("cfg", [None, untuned_reduce_config(D), ReduceConfig(4, 128, 4, 4, 1)],
                         ids=lambda c: "table" if c is None else _cfg_id(c))
def test_reduce_map_form(cfg: ReduceConfig | None, device: torch.device) -> None:
    heads = 3
    flat_o, flat_lse, arrays, dense = _decode_layout(heads)
    m = ReduceMap(*(a.to(device) for a in arrays), num_heads=heads, max_parts=20)
    num_tokens = len(dense)
    out = nan_like(torch.empty(num_tokens, heads, D, dtype=torch.bfloat16, device=device))
    lse = torch.full((num_tokens, heads), float("nan"), device=device)
    got = merge_states(flat_o.to(device), flat_lse.to(device), out=out, lse=lse, reduce_map=m, config=cfg)
    assert got[0] is out and got[1] is lse
    for t, parts in enumerate(dense):
        if parts is None:  # skipped: left as it was
            assert torch.isnan(out[t].float()).all() and torch.isnan(lse[t]).all()
            continue
        _check(out[t : t + 1], lse[t : t + 1], parts[0][:, None], parts[1][:, None])

    out2, lse2 = merge_states(flat_o.to(device), flat_lse.to(device), reduce_map=m, config=cfg)
    assert torch.equal(out2[2].cpu(), torch.zeros(heads, D, dtype=torch.bfloat16))
    assert torch.isneginf(lse2[2].cpu()).all()
    keep = torch.tensor([0, 1, 3])
    assert torch.equal(out2.cpu()[keep], out.cpu()[keep]) and torch.equal(lse2.cpu()[keep], lse.cpu()[keep])


def _map_kwargs(device: torch.device) -> dict:
    i32 = {"dtype": torch.int32, "device": device}
    return {"partial_out": torch.randn(12, D, device=device), "partial_lse": torch.randn(12, device=device),
            "reduce_map": ReduceMap(torch.tensor([0, 6], **i32), torch.tensor([2, 2], **i32),
                                    torch.tensor([3, 3], **i32), num_heads=3)}


MAP_ERRORS = [
    ("part_row-int64", lambda kw, m: {"reduce_map": ReduceMap(m.part_row.long(), m.num_parts, m.part_stride, 3)},
     TypeError, "reduce_map.part_row"),
    ("num_parts-length", lambda kw, m: {"reduce_map": ReduceMap(m.part_row, m.num_parts[:1], m.part_stride, 3)},
     ValueError, "reduce_map.num_parts"),
    ("part_stride-2d", lambda kw, m: {"reduce_map": ReduceMap(m.part_row, m.num_parts, m.part_stride[None], 3)},
     ValueError, "reduce_map.part_stride"),
    ("num_heads-0", lambda kw, m: {"reduce_map": ReduceMap(m.part_row, m.num_parts, m.part_stride, 0)},
     ValueError, "reduce_map.num_heads"),
    ("max_parts-float", lambda kw, m: {"reduce_map": ReduceMap(m.part_row, m.num_parts, m.part_stride, 3, 2.0)},
     TypeError, "reduce_map.max_parts"),
    ("map-tuple", lambda kw, m: {"reduce_map": (m.part_row, m.num_parts, m.part_stride)}, TypeError, "reduce_map"),
    ("partial_out-4d", lambda kw, m: {"partial_out": kw["partial_out"].view(1, 4, 3, D)}, ValueError,
     "partial_out"),
    ("partial_lse-length", lambda kw, m: {"partial_lse": kw["partial_lse"][:5]}, ValueError, "partial_lse"),
    ("out-shape", lambda kw, m: {"out": torch.empty(2, 4, D, dtype=torch.bfloat16, device=kw["partial_out"].device)},
     ValueError, "out"),
    ("config-tuple", lambda kw, m: {"config": (1, 512, 16, 4, 1)}, TypeError, "config"),
]


@pytest.mark.parametrize("change, exc, name", [e[1:] for e in MAP_ERRORS], ids=[e[0] for e in MAP_ERRORS])
def test_reduce_map_rejects(change, exc: type[Exception], name: str, device: torch.device) -> None:
    kw = _map_kwargs(device)
    kw.update(change(kw, kw["reduce_map"]))
    with pytest.raises(exc, match=name.replace(".", r"\.")):
        merge_states(**kw)


# --------------------------------------------------------------------------------------------
# The tuning table.
# --------------------------------------------------------------------------------------------

A = ReduceConfig(block_h=1, block_d=128, block_s=8, num_warps=4, num_stages=1)
B = ReduceConfig(block_h=4, block_d=256, block_s=4, num_warps=8, num_stages=1)
C = ReduceConfig(block_h=2, block_d=512, block_s=4, num_warps=8, num_stages=2)


@pytest.fixture
def table_file(tmp_path: Path) -> Path:
    info = {"gpu": "Test GPU", "sm_count": "132", "date": "2026-01-01", "torch": "x", "triton": "y",
            "commit": "z", "command": "python -m openmla.tune reduce"}
    rows = [table_row(info, (4, 16, D, 16), A, 3.0, 6.0), table_row(info, (64, 16, D, 16), B, 9.0, 12.0),
            table_row(info, (4, 128, D, 4), C, 5.0, 6.0)]
    path = tmp_path / "reduce_test_gpu.csv"
    write_table(rows, path)
    return path


def test_table_exact_nearest_and_miss(table_file: Path) -> None:
    table = load_reduce_table(table_file)
    assert load_reduce_table(table_file) is table  # read once
    assert lookup(table, 4, 16, D, 16) == A and lookup(table, 64, 16, D, 16) == B  # exact
    assert lookup(table, 5, 16, D, 17) == A  # nearest tokens / splits, same heads
    assert lookup(table, 40, 16, D, 16) == B
    assert lookup(table, 64, 32, D, 16) == B  # heads 32: nearest is 16 (log2 gap 1 against 2)
    assert lookup(table, 64, 100, D, 16) == C  # heads 100: nearest is 128
    assert lookup(table, 4, 16, 256, 16) is None  # no row for this D
    assert choose_reduce_config(table, 4, 16, D, 16, 132) == A
    assert choose_reduce_config(table, 4, 16, 256, 16, 132) == heuristic_reduce_config(4, 16, 256, 16, 132)
    assert choose_reduce_config({}, 8, 16, D, 4, 132) == heuristic_reduce_config(8, 16, D, 4, 132)


def test_table_missing_or_malformed(tmp_path: Path) -> None:
    assert load_reduce_table(tmp_path / "reduce_absent.csv") == {}
    bad = tmp_path / "reduce_bad.csv"
    bad.write_text("tokens,heads,d,splits\n4,16,512,16\n")
    with pytest.raises(ValueError, match="block_h"):
        load_reduce_table(bad)
    worse = tmp_path / "reduce_worse.csv"
    worse.write_text("tokens,heads,d,splits,block_h,block_d,block_s,num_warps,num_stages\n4,16,512,16,3,512,4,4,1\n")
    with pytest.raises(ValueError, match="line 2"):
        load_reduce_table(worse)


def test_shipped_tables_load() -> None:
    for path in TABLE_DIR.glob("reduce_*.csv"):
        table = load_reduce_table(path)
        assert table, f"{path} is empty"
        for (tokens, heads, d, splits), cfg in table.items():  # every row from the tuner's space
            assert cfg in (untuned_reduce_config(d), *reduce_candidates(splits, heads, d)), (path, tokens, cfg)


def test_candidate_space() -> None:
    for splits in (1, 2, 3, 5, 9, 16, 17, 32, 40):
        cands = reduce_candidates(splits, 128, D)
        assert cands and len(cands) == len(set(cands))
        full = min(1 << (splits - 1).bit_length(), 32)
        assert {c.block_s for c in cands} <= {full, full // 2}
        for c in cands:
            tile = c.block_h * c.block_d * c.block_s
            assert tile // (32 * c.num_warps) in (16, 32, 64) and c.block_d <= D
    assert all(c.block_h <= 2 for c in reduce_candidates(4, 2, D))  # no head block past the heads
    assert all(c.block_d <= 64 for c in reduce_candidates(4, 16, 64))


def test_tuner_grids() -> None:
    import argparse

    def args(**kw) -> argparse.Namespace:
        return argparse.Namespace(**({"quick": False, "grid": "table", "tokens": None, "heads": None,
                                      "splits": None} | kw))

    bench = grid_points(args(grid="bench"), 132)
    assert len(bench) == 24 and (4, 16, 32) in bench and (4, 128, 17) in bench
    assert all(s in (BENCH_FIXED_SPLITS, adaptive_num_splits(t, h, 132)) for t, h, s in bench)
    table = grid_points(args(), 132)
    assert set(bench) <= set(table) and (256, 128, 8) in table
    assert grid_points(args(tokens=(4,), heads=(16,), splits=(2,)), 132) == [(4, 16, 2), (4, 16, 32)]


def test_heuristic_follows_the_split_count() -> None:
    for splits in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 100):
        cfg = heuristic_reduce_config(64, 16, D, splits)
        assert cfg.block_s == min(1 << max(splits - 1, 0).bit_length(), 32) and cfg.num_stages == 1
        assert cfg in (*reduce_candidates(splits, 16, D), ReduceConfig(1, 256, 1, 1, 1))


def test_cpu_uses_the_interpreter_config() -> None:
    assert reduce_config(64, 16, D, 16, torch.device("cpu")) == interpreter_reduce_config(16, D, 16)


def test_gpu_slug_and_adaptive_splits() -> None:
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert gpu_slug(" NVIDIA H200 ") == "nvidia_h200"
    assert [adaptive_num_splits(t, 16, 132) for t in (4, 16, 32, 64, 128, 256)] == [32, 9, 5, 3, 2, 2]
    assert [adaptive_num_splits(t, 128, 132) for t in (4, 16, 32, 64)] == [17, 5, 3, 2]
    for t in (1, 3, 7, 50, 1000):
        s = adaptive_num_splits(t, 16, 132)
        assert s == 2 or t * (s - 1) < 132 <= t * s or s == 32  # the fewest that fill the GPU


def test_reduce_config_validates() -> None:
    with pytest.raises(ValueError, match="block_h"):
        ReduceConfig(block_h=3, block_d=512, block_s=4, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="block_d"):
        ReduceConfig(block_h=1, block_d=8, block_s=4, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="num_warps"):
        ReduceConfig(block_h=1, block_d=512, block_s=4, num_warps=3, num_stages=1)


# --------------------------------------------------------------------------------------------
# The tuner (its timing faked on the CPU).
# --------------------------------------------------------------------------------------------


def test_tuner_picks_the_fastest_and_writes_a_loadable_table(tmp_path: Path, device: torch.device) -> None:
    def fake_time(fns: list) -> float:
        fns[0]()
        fake_time.calls += 1
        return [6.0, 5.0, 2.0, 4.0][fake_time.calls - 1]

    fake_time.calls = 0
    untuned = untuned_reduce_config(64)
    cands = (A, B, C)
    best, us, untuned_us = tune_point(2, 3, 64, 3, cands, untuned, fake_time, device)
    assert (best, us, untuned_us) == (B, 2.0, 6.0)
    path = tmp_path / "reduce_x.csv"
    write_table([table_row({"gpu": "x", "sm_count": "1"}, (2, 3, 64, 3), best, us, untuned_us)], path)
    assert load_reduce_table(path) == {(2, 3, 64, 3): B}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_tuner_without_gpu_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from openmla.tune import main

    assert main(["reduce", "--quick"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# GPU: the micro-benchmark's shapes.
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, heads, splits", [(4, 16, 32), (64, 16, 16), (16, 128, 5), (256, 128, 2)])
@pytest.mark.parametrize("cfg", list(dict.fromkeys([None, untuned_reduce_config(D), *_shipped_configs(), *HEURISTIC])),
                         ids=lambda c: "table" if c is None else _cfg_id(c))
def test_gpu_candidates_at_benchmark_shapes(tokens: int, heads: int, splits: int, cfg: ReduceConfig | None,
                                            ) -> None:
    dev = torch.device("cuda")
    part_o, part_lse = make_partials(splits, tokens, heads, D, 1, dev, seed=splits)
    out, lse = merge_states(part_o[0], part_lse[0], config=cfg)
    check_merge(out, lse, *reference_merge(part_o[0], part_lse[0]))
    assert math.isfinite(lse.sum().item())


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, heads, splits", [(4, 16, 32), (64, 128, 2)])
def test_gpu_pdl_launch_is_bitwise_the_plain_launch(tokens: int, heads: int, splits: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Programmatic dependent launch changes when programs start, never what they compute; a
    chain of PDL merges in a CUDA graph, each reading what the one before wrote, stays ordered."""
    from openmla.kernels.merge import use_pdl

    dev = torch.device("cuda")
    part_o, part_lse = make_partials(splits, tokens, heads, D, 1, dev, seed=7)
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("OPENMLA_REDUCE_PDL", flag)
        results[flag] = merge_states(part_o[0], part_lse[0])
    assert use_pdl(dev) == (torch.cuda.get_device_capability()[0] >= 9)
    assert torch.equal(results["0"][0], results["1"][0]) and torch.equal(results["0"][1], results["1"][1])

    # chain: merge k's output (as fp32) is piece 0 of merge k + 1; the graph must keep the order
    o = part_o[0].clone()
    lse_in = part_lse[0].clone()
    out = torch.empty(tokens, heads, D, dtype=torch.bfloat16, device=dev)
    lse = torch.empty(tokens, heads, device=dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(4):
            merge_states(o, lse_in, out=out, lse=lse)
            o[0].copy_(out)
            lse_in[0].copy_(lse)
    o_ref, lse_ref = part_o[0].clone(), part_lse[0].clone()
    o.copy_(o_ref)
    lse_in.copy_(lse_ref)
    graph.replay()
    monkeypatch.setenv("OPENMLA_REDUCE_PDL", "0")
    for _ in range(4):
        ref_out, ref_lse = merge_states(o_ref, lse_ref)
        o_ref[0].copy_(ref_out)
        lse_ref[0].copy_(ref_lse)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.gpu
def test_gpu_timer_and_cuda_state() -> None:
    from openmla.reduce_timing import cuda_state, time_us, time_us_stream

    a = torch.randn(64 << 20, device="cuda")  # 256 MiB: far past L2, far past launch overhead
    graph_us, stream_us = time_us([lambda: a.mul_(1.0)]), time_us_stream([lambda: a.mul_(1.0)])
    assert 0.8 < stream_us / graph_us < 1.25
    assert 2 * a.numel() * 4 / graph_us / 1e3 > 500  # GB/s: a real kernel was timed
    assert cuda_state() == "ok"


def test_ordered_merge_bits_do_not_depend_on_the_config(device: torch.device) -> None:
    """Batch-invariant plans merge with ``ordered=True`` and whatever config their batch looks
    up: the pieces are added one by one in piece order after one max over all of them, so every
    config gives the same bits. The default form's lse bits do depend on the step (so this test
    could see a difference)."""
    d = 64  # few programs: the interpreter pays per program
    configs = [ReduceConfig(1, 64, 2, 1, 1), ReduceConfig(16, 16, 1, 1, 1), ReduceConfig(4, 32, 8, 2, 1),
               ReduceConfig(2, 64, 32, 4, 2), ReduceConfig(16, 64, 4, 8, 3)]
    gen = torch.Generator().manual_seed(3)
    parts = torch.randn(33, 2, 13, d, generator=gen).to(device)
    part_lse = (4 * torch.randn(33, 2, 13, generator=gen)).to(device)
    part_lse[5] = float("-inf")  # an empty piece: its o (NaN) must never be read
    parts[5] = float("nan")
    part_lse[:, 1, 3] = float("-inf")  # a row with no finite piece
    results = [merge_states(parts, part_lse, config=dataclasses.replace(c, ordered=True)) for c in configs]
    for c, (out, lse) in zip(configs[1:], results[1:]):
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1]), c
    _check(results[0][0], results[0][1], parts, part_lse)
    tree = [merge_states(parts, part_lse, config=c)[1] for c in configs[:3]]  # fp32 lse: every bit
    assert not (torch.equal(tree[0], tree[1]) and torch.equal(tree[0], tree[2]))


def test_decode_merge_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode's merge of at most two pieces (L2-resident partials) takes the wide config on a
    GPU; more pieces, the interpreter and CUDA-graph plans keep the table's choice."""
    from openmla import tuning

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert tuning.decode_merge_config(64, 16, D, 2, cpu) == tuning.reduce_config(64, 16, D, 2, cpu)
    monkeypatch.setattr(tuning, "is_interpreting", lambda: False)
    monkeypatch.setattr(tuning, "_cuda_config", lambda *key: ("table", key))
    for splits in (1, 2):
        for d in (64, D):
            cfg = tuning.decode_merge_config(64, 32, d, splits, gpu)
            assert cfg == ReduceConfig(2, min(512, d), 2, 2, 1) and d % cfg.block_d == 0
    assert tuning.decode_merge_config(64, 32, D, 3, gpu)[0] == "table"
    # CUDA-graph plans' fixed key keeps the table: their requests may have many pieces
    assert tuning.decode_reduce_config(64, D, gpu, tilelang=True)[0] == "table"


def test_ordered_reduce_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch-invariant plans' merge configs are the ordered form, valid for D, on the interpreter
    and on a GPU (the GPU's choice made without one: it asks nothing of the device)."""
    from openmla import tuning

    assert tuning.ordered_reduce_config(64, 16, D, 2, torch.device("cpu")).ordered
    monkeypatch.setattr(tuning, "is_interpreting", lambda: False)
    for splits in (1, 2, 3, 4, 5, 17, 128):
        for d in (64, D):
            cfg = tuning.ordered_reduce_config(1, 16, d, splits, torch.device("cuda"))
            assert cfg.ordered and d % cfg.block_d == 0 and cfg.block_s >= min(splits, 32)
