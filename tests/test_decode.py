"""Paged MLA decode through ``BatchMLAPagedAttentionWrapper`` against the float64 oracle.

Runs on the CPU through Triton's interpreter by default and on the GPU when one is present.
Every run writes into NaN-poisoned ``out``/``lse``: ``assert_attention_close`` rejects NaN, so
an element the library forgot to write fails the test. The caches come from
``make_paged_case``: shuffled pages, NaN in every slot no request owns, NaN pages indexed past
each request's last page, so a kernel that reads one token too many fails too.
"""

from __future__ import annotations

import collections
import itertools
import zlib
from dataclasses import dataclass

import pytest
import torch

from openmla import BatchMLAPagedAttentionWrapper
from openmla.testing import PagedCase, assert_attention_close, make_paged_case, nan_like

# ---------------------------------------------------------------------------------------------
# The case grid.
#
# Head count and page size are what change the kernel's tiling and addressing (rows per tile,
# row blocks, page arithmetic), so every head count meets every page size. The full product of
# all factors is ~10^4 cases, far too slow under the interpreter, so the remaining factors
# (qo_len x causal, forced split count, packed/separate layout, dtype, whether the batch holds a
# request long enough for the automatic schedule to split it) are chosen per case by a greedy
# all-pairs cover: every pair of values of any two factors appears in at least one case.
# Each batch holds the page-size edge lengths {P+1, 0, 1, P, P-1} (a page plus one token, an
# empty request, a single token, a page minus one), so the cases exercise empty requests and
# split pieces that receive no tokens (1 token cut into 7 pieces); with many heads x query
# tokens only the first few of them (MAX_TILE_ROWS), never fewer than P+1. With causal, a
# request sees qo_len = min(qo_len, kv_len): the empty request then has no query tokens
# (qo_indptr holds equal neighbours) and short requests get fewer query tokens than the others.
# ---------------------------------------------------------------------------------------------

HEADS = (1, 2, 4, 9, 16, 64, 128)
PAGE_SIZES = (1, 3, 16, 64)
QO_CAUSAL = ((1, False), (1, True), (2, False), (2, True), (4, False), (4, True))
SPLITS = (None, 1, 2, 7)  # None: the automatic (balanced) schedule
PACKED = (False, True)
DTYPES = (torch.bfloat16, torch.float16)
LONG = (False, True)
LONG_KV = 300  # > DEFAULT_SCHEDULE.min_chunk (256): the automatic schedule splits it
# Under the interpreter a split request costs merge time per (query token, head) row (~20 ms a
# row through the merge kernel of commit d18f4d3): the short requests of a case hold at most
# MAX_TILE_ROWS such rows between them, so big tiles do not dominate the suite's time.
MAX_TILE_ROWS = 256


@dataclass(frozen=True)
class DecodeCase:
    num_heads: int
    page_size: int
    qo_len: int
    causal: bool
    num_splits: int | None
    packed: bool
    dtype: torch.dtype
    long: bool

    @property
    def kv_lens(self) -> list[int]:
        p = self.page_size
        edges = list(dict.fromkeys([p + 1, 0, 1, p, max(p - 1, 0)]))
        keep = max(1, MAX_TILE_ROWS // (self.qo_len * self.num_heads))
        return sorted(edges[:keep]) + ([LONG_KV + p] if self.long else [])

    @property
    def qo_lens(self) -> list[int]:
        if self.causal:
            return [min(self.qo_len, n) for n in self.kv_lens]
        return [self.qo_len] * len(self.kv_lens)

    @property
    def id(self) -> str:
        parts = [f"B{len(self.kv_lens)}", f"H{self.num_heads}", f"P{self.page_size}",
                 f"Q{self.qo_len}"]
        if self.causal:
            parts.append("causal")
        parts.append("Sauto" if self.num_splits is None else f"S{self.num_splits}")
        parts.append("bf16" if self.dtype == torch.bfloat16 else "fp16")
        if self.packed:
            parts.append("packed")
        if self.long:
            parts.append("long")
        return "-".join(parts)


def _pairwise_cover(reverse: bool) -> list[tuple[int, ...]]:
    """Rows of factor-value indices: every head count x page size once, then greedy all-pairs
    over the other factors. Ties go to the least used values (then to the front of the candidate
    list, or to its back with ``reverse``), so the rows spread over every value."""
    factors = [HEADS, PAGE_SIZES, QO_CAUSAL, SPLITS, PACKED, DTYPES, LONG]
    pairs = list(itertools.combinations(range(len(factors)), 2))
    uncovered = {(i, a, j, b) for i, j in pairs
                 for a in range(len(factors[i])) for b in range(len(factors[j]))}

    used = collections.Counter()

    def gain(row: tuple[int, ...]) -> tuple[int, int]:
        return (sum((i, row[i], j, row[j]) in uncovered for i, j in pairs),
                -sum(used[i, v] for i, v in enumerate(row)))

    def take(row: tuple[int, ...]) -> None:
        rows.append(row)
        used.update(enumerate(row))
        uncovered.difference_update((i, row[i], j, row[j]) for i, j in pairs)

    rest = list(itertools.product(*(range(len(f)) for f in factors[2:])))
    if reverse:
        rest.reverse()
    heads_pages = list(itertools.product(range(len(HEADS)), range(len(PAGE_SIZES))))
    rows: list[tuple[int, ...]] = []
    for hp in heads_pages:
        take(max((hp + r for r in rest), key=gain))
    while uncovered:  # pairs the H x P rows left open (H x (qo_len, causal) alone needs 42 rows)
        i, a, j, b = min(uncovered)
        take(max((row for row in (hp + r for hp in heads_pages for r in rest)
                  if row[i] == a and row[j] == b), key=gain))
    return rows


def _grid() -> list[DecodeCase]:
    """Two all-pairs covers with opposite tie-breaks (84 cases): every pair of factor values
    appears in at least two cases."""
    rows = _pairwise_cover(reverse=False)
    rows += [r for r in _pairwise_cover(reverse=True) if r not in rows]
    cases = []
    for h, p, qc, s, pk, dt, lg in rows:
        qo_len, causal = QO_CAUSAL[qc]
        cases.append(DecodeCase(HEADS[h], PAGE_SIZES[p], qo_len, causal, SPLITS[s], PACKED[pk],
                                DTYPES[dt], LONG[lg]))
    return cases


GRID = _grid()


def run_checked(wrapper: BatchMLAPagedAttentionWrapper, case: PagedCase) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the planned ``case`` into NaN-poisoned buffers and check them against the oracle."""
    out = nan_like(case.q_nope)
    lse = torch.full(case.q_nope.shape[:2], float("nan"), dtype=torch.float32, device=case.q_nope.device)
    got_out, got_lse = wrapper.run(*case.run_args(), out=out, lse=lse, return_lse=True)
    assert got_out is out and got_lse is lse
    assert_attention_close(out, lse, case.reference(), case.lowp_reference())
    return out, lse


@pytest.mark.parametrize("c", GRID, ids=lambda c: c.id)
def test_decode_grid(c: DecodeCase, device: torch.device, workspace: torch.Tensor) -> None:
    case = make_paged_case(c.kv_lens, c.num_heads, c.page_size, qo_len=c.qo_lens, causal=c.causal,
                           dtype=c.dtype, device=device, packed=c.packed, seed=zlib.crc32(c.id.encode()))
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*case.plan_args(), num_splits=c.num_splits)
    if c.num_splits is not None:
        # every request with query tokens is cut into exactly num_splits pieces
        assert wrapper.plan_info["pieces"] == c.num_splits * sum(1 for q in c.qo_lens if q)
    run_checked(wrapper, case)


# Hand-picked cases for what the grid does not single out: many more pieces than tokens, split
# counts around the decode's in-kernel merge limit (INLINE_MERGE_MAX = 16 pieces; more go to the
# merge kernel) and beyond one merge step (8 or 16 pieces), an automatic split of a long request
# with 128 heads, per-request qo_len without causal (including 0), 64-bit index tensors, and
# qo_len x heads beyond one 64-row tile with a partial last tile (126, 100 and 72 rows).


def _extra(case_id: str, kv_lens: list[int], num_heads: int, page_size: int, num_splits: int | None,
           **kw: object) -> object:
    return pytest.param(dict(kv_lens=kv_lens, num_heads=num_heads, page_size=page_size,
                             num_splits=num_splits, **kw), id=case_id)


EXTRA = [
    _extra("B1-H16-P16-kv3-S7", [3], 16, 16, 7),
    _extra("B4-H9-P1-kv0123-S7", [0, 1, 3, 2], 9, 1, 7),
    _extra("B3-H4-P16-Q2-S9", [900, 40, 0], 4, 16, 9, qo_len=2),
    _extra("B2-H16-P64-S20-fp16", [1300, 3], 16, 64, 20, dtype=torch.float16),
    _extra("B2-H9-P16-Q2-S16", [700, 30], 9, 16, 16, qo_len=2),
    _extra("B2-H9-P16-Q2-S17", [700, 30], 9, 16, 17, qo_len=2),
    _extra("B2-H128-P64-Q2-causal-long-Sauto", [700, 5], 128, 64, None, qo_len=2, causal=True),
    _extra("B4-H4-P3-Qmixed-S2", [40, 7, 0, 33], 4, 3, 2, qo_len=[1, 0, 3, 2]),
    _extra("B4-H4-P3-Qmixed-causal-Sauto", [40, 7, 5, 33], 4, 3, None, qo_len=[4, 0, 3, 2], causal=True),
    _extra("B3-H63-P53-Q2-S3-fp16-int64", [100, 0, 17], 63, 53, 3, qo_len=2, dtype=torch.float16,
           index_dtype=torch.int64),
    _extra("B3-H100-P16-Sauto", [300, 2, 77], 100, 16, None),
    _extra("B3-H9-P64-Q8-causal-S2", [90, 8, 33], 9, 64, 2, qo_len=8, causal=True),
]


@pytest.mark.parametrize("spec", EXTRA)
def test_decode_extra(spec: dict, device: torch.device, workspace: torch.Tensor) -> None:
    spec = dict(spec)
    num_splits = spec.pop("num_splits")
    index_dtype = spec.pop("index_dtype", torch.int32)
    case = make_paged_case(device=device, **spec)
    for name in ("qo_indptr", "kv_indptr", "kv_indices", "kv_len"):
        setattr(case, name, getattr(case, name).to(index_dtype))
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*case.plan_args(), num_splits=num_splits)
    run_checked(wrapper, case)


def test_skewed_auto_schedule_splits(device: torch.device, workspace: torch.Tensor) -> None:
    """The automatic schedule cuts a long request among short ones (else the merge is untested)."""
    case = make_paged_case([1500, 3, 1, 64], 16, 16, device=device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*case.plan_args())
    assert wrapper.plan_info["split_requests"] >= 1
    assert wrapper.plan_info["pieces"] > 4
    run_checked(wrapper, case)


@pytest.mark.parametrize("num_splits", [None, 3])
def test_empty_batch(num_splits: int | None, device: torch.device, workspace: torch.Tensor) -> None:
    case = make_paged_case([], 16, 16, device=device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*case.plan_args(), num_splits=num_splits)
    out, lse = wrapper.run(*case.run_args(), return_lse=True)
    assert out.shape == (0, 16, 512) and lse.shape == (0, 16)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("qo_len", [1, 2])
def test_all_requests_empty(num_splits: int | None, qo_len: int, device: torch.device,
                            workspace: torch.Tensor) -> None:
    case = make_paged_case([0, 0, 0], 9, 16, qo_len=qo_len, device=device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*case.plan_args(), num_splits=num_splits)
    out, lse = run_checked(wrapper, case)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("causal", [False, True])
def test_request_without_query_tokens(causal: bool, device: torch.device, workspace: torch.Tensor) -> None:
    """qo_indptr with equal neighbours: requests 1 and 3 have no query token."""
    case = make_paged_case([20, 35, 9, 0, 70], 16, 16, qo_len=[2, 0, 1, 0, 2], causal=causal,
                           device=device)
    for num_splits in (None, 1, 2):
        wrapper = BatchMLAPagedAttentionWrapper(workspace)
        wrapper.plan(*case.plan_args(), num_splits=num_splits)
        run_checked(wrapper, case)


def test_allocating_run_and_return_lse_false(device: torch.device, workspace: torch.Tensor) -> None:
    case = make_paged_case([5, 0, 130], 16, 16, device=device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*case.plan_args(), num_splits=2)
    out_given, lse_given = run_checked(wrapper, case)

    out_alloc, lse_alloc = wrapper.run(*case.run_args(), return_lse=True)
    assert out_alloc.shape == case.q_nope.shape and out_alloc.dtype == case.q_nope.dtype
    assert out_alloc.device == case.q_nope.device and out_alloc.is_contiguous()
    assert lse_alloc.shape == case.q_nope.shape[:2] and lse_alloc.dtype == torch.float32
    assert torch.equal(out_alloc, out_given)
    assert torch.equal(lse_alloc, lse_given)

    only_out = wrapper.run(*case.run_args())
    assert isinstance(only_out, torch.Tensor)
    assert torch.equal(only_out, out_given)

    out = nan_like(case.q_nope)
    returned = wrapper.run(*case.run_args(), out=out, return_lse=False)
    assert returned is out
    assert torch.equal(out, out_given)


def test_strided_queries_and_output(device: torch.device, workspace: torch.Tensor) -> None:
    """q_nope/q_pe as views of one [T, H, 576] tensor, out as a view into a wider buffer."""
    case = make_paged_case([33, 1, 17], 9, 16, qo_len=2, device=device)
    q = torch.cat([case.q_nope, case.q_pe], dim=-1)
    case.q_nope, case.q_pe = q[..., :512], q[..., 512:]
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*case.plan_args(), num_splits=2)
    wide = torch.full((case.q_nope.shape[0], 9, 600), float("nan"), dtype=q.dtype, device=device)
    out = wide[..., :512]
    lse_wide = torch.full((case.q_nope.shape[0], 12), float("nan"), device=device)
    lse = lse_wide[:, :9]
    wrapper.run(*case.run_args(), out=out, lse=lse)
    assert_attention_close(out, lse, case.reference(), case.lowp_reference())
    assert torch.isnan(wide[..., 512:]).all(), "wrote outside out's view"
    assert torch.isnan(lse_wide[:, 9:]).all(), "wrote outside lse's view"


def test_replan_same_wrapper(device: torch.device, workspace: torch.Tensor) -> None:
    """A re-plan with other lengths, heads and page size leaves no stale state behind."""
    first = make_paged_case([40, 3, 200], 16, 16, device=device, seed=1)
    second = make_paged_case([1, 90, 0, 7, 300], 4, 3, qo_len=2, causal=False, device=device, seed=2)
    third = make_paged_case([5, 6], 128, 64, qo_len=2, causal=True, device=device, seed=3)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)

    wrapper.plan(*first.plan_args(), num_splits=7)
    out1, lse1 = run_checked(wrapper, first)
    wrapper.plan(*second.plan_args())
    run_checked(wrapper, second)
    wrapper.plan(*third.plan_args(), num_splits=1)
    run_checked(wrapper, third)
    wrapper.plan(*first.plan_args(), num_splits=7)
    out1b, lse1b = run_checked(wrapper, first)
    assert torch.equal(out1, out1b) and torch.equal(lse1, lse1b)


@pytest.mark.parametrize("num_splits", [None, 1, 3, 20])
def test_run_twice_is_bitwise_identical(num_splits: int | None, device: torch.device,
                                        workspace: torch.Tensor) -> None:
    case = make_paged_case([700, 2, 64, 0], 16, 16, qo_len=1, device=device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*case.plan_args(), num_splits=num_splits)
    out_a, lse_a = run_checked(wrapper, case)
    for _ in range(3):  # on a GPU the pieces finish in a different order every time
        out_b, lse_b = run_checked(wrapper, case)
        assert torch.equal(out_a.view(torch.int16), out_b.view(torch.int16))
        assert torch.equal(lse_a.view(torch.int32), lse_b.view(torch.int32))


def test_env_num_splits(monkeypatch: pytest.MonkeyPatch, device: torch.device,
                        workspace: torch.Tensor) -> None:
    case = make_paged_case([50, 0, 9, 130], 16, 16, device=device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*case.plan_args(), num_splits=3)
    out_arg, lse_arg = run_checked(wrapper, case)
    info_arg = wrapper.plan_info

    monkeypatch.setenv("OPENMLA_NUM_SPLITS", "3")
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*case.plan_args())
    assert wrapper.plan_info == info_arg
    assert wrapper.plan_info["pieces"] == 3 * 4
    out_env, lse_env = run_checked(wrapper, case)
    assert torch.equal(out_env, out_arg) and torch.equal(lse_env, lse_arg)

    # an explicit argument wins over the environment
    wrapper.plan(*case.plan_args(), num_splits=1)
    assert wrapper.plan_info["pieces"] == 4


@pytest.mark.parametrize("deterministic", [False, True])
def test_eager_grid_holds_the_real_pieces_only(deterministic: bool, device: torch.device,
                                               workspace: torch.Tensor) -> None:
    """An eager plan's decode grid is its pieces, not the fixed capacity (padding programs would
    each still be scheduled: ~1000 in a batch-invariant plan); a graph plan keeps the capacity.
    Batch-invariant plans give the same bits either way."""
    case = make_paged_case([900, 300, 0, 17], 16, 16, device=device, seed=6)
    eager = BatchMLAPagedAttentionWrapper(workspace)
    eager.plan(*case.plan_args(), deterministic=deterministic)
    info = eager.plan_info
    assert info["pieces"] < info["work_capacity"]
    work = eager._plan.arrays
    assert [t.numel() for t in (work.work_req, work.work_kv_begin, work.work_kv_end, work.work_part_row,
                                work.work_num_parts, work.work_part_base)] == [info["pieces"]] * 6
    assert (work.work_req >= 0).all()
    graph = BatchMLAPagedAttentionWrapper(torch.empty_like(workspace), use_cuda_graph=True)
    graph.plan(*case.plan_args(), deterministic=deterministic)
    assert graph._plan.arrays.work_req.numel() == info["work_capacity"]
    out_e, lse_e = run_checked(eager, case)
    out_g, lse_g = run_checked(graph, case)
    if deterministic:  # the default mode's graph plan merges with another config
        assert torch.equal(out_e, out_g) and torch.equal(lse_e, lse_g)


def test_graph_mode_replan_same_batch(device: torch.device, workspace: torch.Tensor) -> None:
    """``use_cuda_graph=True`` (meaningful on any device): device arrays and grids are fixed by
    the first plan; later plans of the same batch size rewrite them in place, with lengths
    longer, shorter and empty, under the automatic and the pinned schedule."""
    max_lens = [900, 300, 64, 17]
    base = make_paged_case(max_lens, 16, 16, device=device, seed=4)
    bufs = {name: torch.empty(n, dtype=torch.int32, device=device) for name, n in
            (("qo_indptr", 5), ("kv_indptr", 5), ("kv_indices", base.kv_indices.numel()), ("kv_len_arr", 4))}
    for num_splits in (None, 3):
        wrapper = BatchMLAPagedAttentionWrapper(workspace, use_cuda_graph=True, **bufs)
        for lens in ([5, 1, 64, 17], [900, 300, 2, 0], [0, 0, 0, 0], [33, 299, 63, 16]):
            case = make_paged_case(max_lens, 16, 16, device=device, seed=4)
            case.kv_len = torch.tensor(lens, dtype=torch.int32, device=device)
            wrapper.plan(*case.plan_args(), num_splits=num_splits)
            run_checked(wrapper, case)
        with pytest.raises(ValueError, match="batch"):
            wrapper.plan(*make_paged_case([3, 4], 16, 16, device=device).plan_args())
