"""Bad input (SPEC 4): every public entry point raises ValueError or TypeError naming the
argument, and nothing the caller owns is modified (except ``out``/``lse``), whether the call
fails or succeeds."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
import torch

from openmla import BatchMLAPagedAttentionWrapper, merge_states
from openmla.testing import PagedCase, make_paged_case, nan_like

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern (NaN-aware, -0.0 vs 0.0 aware)."""
    return t.detach().view(_BITS[t.element_size()]).cpu().clone()


class Snapshot:
    """Bit patterns of caller-owned tensors, to check that a call left them alone."""

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self.tensors = [t for t in tensors if isinstance(t, torch.Tensor) and t.device.type != "meta"]
        self.bits = [_bits(t) for t in self.tensors]

    def assert_unchanged(self) -> None:
        for t, b in zip(self.tensors, self.bits, strict=True):
            assert torch.equal(_bits(t), b), f"a caller tensor of shape {tuple(t.shape)} was modified"


def _case(device: torch.device, **kw) -> PagedCase:
    spec = {"kv_lens": [5, 0, 19], "num_heads": 16, "page_size": 4, "qo_len": 1, "device": device}
    spec.update(kw)
    return make_paged_case(**spec)


def _case_tensors(case: PagedCase) -> list[torch.Tensor]:
    return [case.q_nope, case.q_pe, case.ckv_cache, case.kpe_cache, case.qo_indptr,
            case.kv_indptr, case.kv_indices, case.kv_len]


def _plan_kwargs(case: PagedCase) -> dict:
    names = ("qo_indptr", "kv_indptr", "kv_indices", "kv_len_arr", "num_heads", "head_dim_ckv",
             "head_dim_kpe", "page_size", "causal", "sm_scale", "q_data_type", "kv_data_type")
    return dict(zip(names, case.plan_args(), strict=True))


def _expect(exc: type[Exception], match: str, fn: Callable[[], object],
            watched: Iterable[torch.Tensor]) -> None:
    snap = Snapshot(watched)
    with pytest.raises(exc, match=match):
        fn()
    snap.assert_unchanged()


# --------------------------------------------------------------------------------------------
# plan(): one bad argument at a time, everything else valid. Each entry: (id, change, error,
# the argument's name that the message must contain). ``change`` edits the plan keywords.
# --------------------------------------------------------------------------------------------


def _set(name: str, value: object) -> Callable[[dict], None]:
    def change(kw: dict) -> None:
        kw[name] = value(kw) if callable(value) and not isinstance(value, torch.dtype) else value
    return change


def _i32(values: list[int]) -> Callable[[dict], torch.Tensor]:
    return lambda kw: torch.tensor(values, dtype=torch.int32)


PLAN_ERRORS = [
    ("q_data_type-float32", _set("q_data_type", torch.float32), TypeError, "q_data_type"),
    ("q_data_type-int8", _set("q_data_type", torch.int8), TypeError, "q_data_type"),
    ("kv_data_type-mismatch", _set("kv_data_type", torch.float16), TypeError, "kv_data_type"),
    ("qo_indptr-float", _set("qo_indptr", lambda kw: kw["qo_indptr"].float()), TypeError, "qo_indptr"),
    ("kv_indptr-float", _set("kv_indptr", lambda kw: kw["kv_indptr"].float()), TypeError, "kv_indptr"),
    ("kv_indices-float", _set("kv_indices", lambda kw: kw["kv_indices"].float()), TypeError, "kv_indices"),
    ("kv_len_arr-float", _set("kv_len_arr", lambda kw: kw["kv_len_arr"].float()), TypeError, "kv_len_arr"),
    ("kv_len_arr-int16", _set("kv_len_arr", lambda kw: kw["kv_len_arr"].short()), TypeError, "kv_len_arr"),
    ("kv_indices-list", _set("kv_indices", lambda kw: kw["kv_indices"].tolist()), TypeError, "kv_indices"),
    ("qo_indptr-rank2", _set("qo_indptr", lambda kw: kw["qo_indptr"][None]), ValueError, "qo_indptr"),
    ("kv_indptr-rank2", _set("kv_indptr", lambda kw: kw["kv_indptr"][:, None]), ValueError, "kv_indptr"),
    ("kv_indices-rank2", _set("kv_indices", lambda kw: kw["kv_indices"][None]), ValueError, "kv_indices"),
    ("kv_len_arr-rank0", _set("kv_len_arr", lambda kw: kw["kv_len_arr"][0]), ValueError, "kv_len_arr"),
    ("qo_indptr-short", _set("qo_indptr", lambda kw: kw["qo_indptr"][:-1]), ValueError, "qo_indptr"),
    ("kv_indptr-long", _set("kv_indptr", _i32([0, 2, 2, 7, 7])), ValueError, "kv_indptr"),
    ("head_dim_ckv-256", _set("head_dim_ckv", 256), ValueError, "head_dim_ckv"),
    ("head_dim_kpe-128", _set("head_dim_kpe", 128), ValueError, "head_dim_kpe"),
    ("page_size-0", _set("page_size", 0), ValueError, "page_size"),
    ("page_size-neg", _set("page_size", -4), ValueError, "page_size"),
    ("page_size-float", _set("page_size", 4.0), TypeError, "page_size"),
    ("num_heads-0", _set("num_heads", 0), ValueError, "num_heads"),
    ("num_heads-129", _set("num_heads", 129), ValueError, "num_heads"),
    ("num_heads-float", _set("num_heads", 16.0), TypeError, "num_heads"),
    ("qo_indptr-not-from-0", _set("qo_indptr", _i32([1, 2, 3, 4])), ValueError, "qo_indptr"),
    ("qo_indptr-decreasing", _set("qo_indptr", _i32([0, 2, 1, 3])), ValueError, "qo_indptr"),
    ("kv_indptr-not-from-0", _set("kv_indptr", _i32([1, 3, 4, 10])), ValueError, "kv_indptr"),
    ("kv_indptr-decreasing", _set("kv_indptr", _i32([0, 3, 2, 9])), ValueError, "kv_indptr"),
    ("kv_indices-too-short", _set("kv_indices", lambda kw: kw["kv_indices"][:5]), ValueError, "kv_indices"),
    ("kv_indices-negative", _set("kv_indices", lambda kw: torch.cat([kw["kv_indices"][:1] * 0 - 1,
                                                                    kw["kv_indices"][1:]])),
     ValueError, "kv_indices"),
    ("kv_len_arr-beyond-pages", _set("kv_len_arr", _i32([13, 0, 19])), ValueError, "kv_len_arr"),
    ("kv_len_arr-negative", _set("kv_len_arr", _i32([5, -1, 19])), ValueError, "kv_len_arr"),
    ("sm_scale-nan", _set("sm_scale", float("nan")), ValueError, "sm_scale"),
    ("sm_scale-str", _set("sm_scale", "0.1"), TypeError, "sm_scale"),
]


@pytest.mark.parametrize("change, exc, name", [p[1:] for p in PLAN_ERRORS], ids=[p[0] for p in PLAN_ERRORS])
def test_plan_rejects(change: Callable[[dict], None], exc: type[Exception], name: str,
                      device: torch.device, workspace: torch.Tensor) -> None:
    # kv_lens [5, 0, 19], page 4, one extra page per request: kv_indptr [0, 3, 4, 10], so
    # request 0 owns 3 pages (12 tokens) and 13 tokens are beyond its pages
    case = _case(device)
    assert case.kv_indptr.tolist() == [0, 3, 4, 10]
    kw = _plan_kwargs(case)
    change(kw)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    watched = _case_tensors(case) + [v for v in kw.values() if isinstance(v, torch.Tensor)]
    _expect(exc, name, lambda: wrapper.plan(**kw), watched)


@pytest.mark.parametrize("num_kv_heads, exc", [(3, ValueError), (0, ValueError), (2, ValueError),
                                               (1.0, TypeError)])
def test_plan_rejects_num_kv_heads(num_kv_heads: object, exc: type[Exception], device: torch.device,
                                   workspace: torch.Tensor) -> None:
    """3 does not divide 16 heads; 2 divides but MLA has one latent head."""
    case = _case(device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    _expect(exc, "num_kv_heads", lambda: wrapper.plan(*case.plan_args(), num_kv_heads=num_kv_heads),
            _case_tensors(case))


def test_plan_rejects_causal_qo_len_beyond_kv_len(device: torch.device, workspace: torch.Tensor) -> None:
    case = _case(device, kv_lens=[5, 1, 19], qo_len=2, causal=True)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    _expect(ValueError, "qo_len", lambda: wrapper.plan(*case.plan_args()), _case_tensors(case))
    _expect(ValueError, "kv_len_arr", lambda: wrapper.plan(*case.plan_args()), _case_tensors(case))
    wrapper.plan(*case.plan_args()[:8], False, *case.plan_args()[9:])  # fine without causal


@pytest.mark.parametrize("num_splits, exc", [(0, ValueError), (-2, ValueError), (2.0, TypeError)])
def test_plan_rejects_num_splits(num_splits: object, exc: type[Exception], device: torch.device,
                                 workspace: torch.Tensor) -> None:
    case = _case(device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    _expect(exc, "num_splits", lambda: wrapper.plan(*case.plan_args(), num_splits=num_splits),
            _case_tensors(case))


@pytest.mark.parametrize("value", ["0", "-3", "two", "2.5"])
def test_plan_rejects_bad_env_num_splits(value: str, monkeypatch: pytest.MonkeyPatch, device: torch.device,
                                         workspace: torch.Tensor) -> None:
    monkeypatch.setenv("OPENMLA_NUM_SPLITS", value)
    case = _case(device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    _expect(ValueError, "OPENMLA_NUM_SPLITS", lambda: wrapper.plan(*case.plan_args()), _case_tensors(case))


def test_plan_rejects_workspace_too_small_for_splits(device: torch.device) -> None:
    case = _case(device, num_heads=128, qo_len=2, kv_lens=[40, 40])
    wrapper = BatchMLAPagedAttentionWrapper(torch.empty(1 << 16, dtype=torch.uint8, device=device))
    _expect(ValueError, "float_workspace_buffer", lambda: wrapper.plan(*case.plan_args(), num_splits=7),
            _case_tensors(case))


# --------------------------------------------------------------------------------------------
# Construction.
# --------------------------------------------------------------------------------------------


def _other_device(device: torch.device) -> torch.device:
    """A device the wrapper does not run on: CPU next to a GPU, else the meta device."""
    return torch.device("cpu" if device.type == "cuda" else "meta")


def test_constructor_rejects(device: torch.device) -> None:
    ws = torch.empty(1 << 20, dtype=torch.uint8, device=device)
    with pytest.raises(TypeError, match="float_workspace_buffer"):
        BatchMLAPagedAttentionWrapper(ws.cpu().numpy())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float_workspace_buffer"):
        BatchMLAPagedAttentionWrapper(ws.view(1024, 1024)[:, ::2])
    with pytest.raises(ValueError, match="backend"):
        BatchMLAPagedAttentionWrapper(ws, backend="cutlass")
    other = _other_device(device)
    for name in ("qo_indptr", "kv_indptr", "kv_indices", "kv_len_arr"):
        with pytest.raises(ValueError, match=name):
            BatchMLAPagedAttentionWrapper(ws, use_cuda_graph=True,
                                          **{name: torch.zeros(8, dtype=torch.int32, device=other)})
        with pytest.raises(TypeError, match=name):
            BatchMLAPagedAttentionWrapper(ws, use_cuda_graph=True,
                                          **{name: torch.zeros(8, dtype=torch.float32, device=device)})


# --------------------------------------------------------------------------------------------
# run(): inputs that are malformed or do not match the plan.
# --------------------------------------------------------------------------------------------


def test_run_before_plan(device: torch.device, workspace: torch.Tensor) -> None:
    case = _case(device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    _expect(ValueError, "plan", lambda: wrapper.run(*case.run_args()), _case_tensors(case))


def _run_changes(device: torch.device) -> list[tuple[str, Callable[[dict], None], type[Exception], str]]:
    other = _other_device(device)

    def edit(name: str, fn: Callable[[torch.Tensor], object]) -> Callable[[dict], None]:
        def change(kw: dict) -> None:
            kw[name] = fn(kw[name])
        return change

    def meta_like(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t, device=other)

    return [
        ("q_nope-fp16", edit("q_nope", lambda t: t.half()), TypeError, "q_nope"),
        ("q_pe-fp32", edit("q_pe", lambda t: t.float()), TypeError, "q_pe"),
        ("q_nope-not-tensor", edit("q_nope", lambda t: t.tolist()), TypeError, "q_nope"),
        ("q_nope-rank2", edit("q_nope", lambda t: t.flatten(0, 1)), ValueError, "q_nope"),
        ("q_nope-extra-token", edit("q_nope", lambda t: torch.cat([t, t[:1]])), ValueError, "q_nope"),
        ("q_nope-fewer-heads", edit("q_nope", lambda t: t[:, :8]), ValueError, "q_nope"),
        ("q_nope-dim-511", edit("q_nope", lambda t: t[..., :511]), ValueError, "q_nope"),
        ("q_pe-dim-32", edit("q_pe", lambda t: t[..., :32]), ValueError, "q_pe"),
        ("q_pe-extra-head", edit("q_pe", lambda t: torch.cat([t, t[:, :1]], 1)), ValueError, "q_pe"),
        ("q_nope-strided-last", edit("q_nope", lambda t: torch.cat([t, t], -1)[..., ::2]), ValueError,
         "q_nope"),
        ("q_nope-device", edit("q_nope", meta_like), ValueError, "q_nope"),
        ("ckv_cache-fp16", edit("ckv_cache", lambda t: t.half()), TypeError, "ckv_cache"),
        ("kpe_cache-fp16", edit("kpe_cache", lambda t: t.half()), TypeError, "kpe_cache"),
        ("ckv_cache-page-size-8", edit("ckv_cache", lambda t: torch.cat([t, t], 1)), ValueError, "ckv_cache"),
        ("kpe_cache-page-size-2", edit("kpe_cache", lambda t: t[:, :2]), ValueError, "kpe_cache"),
        ("ckv_cache-dim-576", edit("ckv_cache", lambda t: torch.cat([t, t[..., :64]], -1)), ValueError,
         "ckv_cache"),
        ("kpe_cache-other-page-count", edit("kpe_cache", lambda t: torch.cat([t, t[:1]])), ValueError,
         "kpe_cache"),
        ("ckv_cache-rank4", edit("ckv_cache", lambda t: t[None]), ValueError, "ckv_cache"),
        ("ckv_cache-device", edit("ckv_cache", meta_like), ValueError, "ckv_cache"),
        ("kpe_cache-device", edit("kpe_cache", meta_like), ValueError, "kpe_cache"),
        ("out-fp32", edit("out", lambda t: t.float()), TypeError, "out"),
        ("out-fp16", edit("out", lambda t: t.half()), TypeError, "out"),
        ("out-shape", edit("out", lambda t: t[:, :8]), ValueError, "out"),
        ("out-device", edit("out", meta_like), ValueError, "out"),
        ("lse-bf16", edit("lse", lambda t: t.bfloat16()), TypeError, "lse"),
        ("lse-float64", edit("lse", lambda t: t.double()), TypeError, "lse"),
        ("lse-shape", edit("lse", lambda t: t[:, :, None]), ValueError, "lse"),
        ("lse-device", edit("lse", meta_like), ValueError, "lse"),
    ]


RUN_CHANGE_IDS = [c[0] for c in _run_changes(torch.device("cpu"))]


@pytest.mark.parametrize("which", RUN_CHANGE_IDS)
def test_run_rejects(which: str, device: torch.device, workspace: torch.Tensor) -> None:
    _, change, exc, name = next(c for c in _run_changes(device) if c[0] == which)
    case = _case(device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*case.plan_args())
    kw = dict(zip(("q_nope", "q_pe", "ckv_cache", "kpe_cache"), case.run_args(), strict=True))
    kw["out"] = nan_like(case.q_nope)
    kw["lse"] = torch.full(case.q_nope.shape[:2], float("nan"), device=device)
    change(kw)
    watched = _case_tensors(case) + [v for k, v in kw.items() if k not in ("out", "lse")]
    _expect(exc, name, lambda: wrapper.run(**kw, return_lse=True), watched)


@pytest.mark.parametrize("which", RUN_CHANGE_IDS)
def test_run_fast_path_declines_what_the_checks_reject(which: str, device: torch.device,
                                                       workspace: torch.Tensor) -> None:
    """run() skips its checks when one pass of plain comparisons finds every argument as planned
    (``_common_call``); that pass must decline each argument the checks reject, and take the
    planned call itself."""
    _, change, _, _ = next(c for c in _run_changes(device) if c[0] == which)
    case = _case(device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*case.plan_args())
    kw = dict(zip(("q_nope", "q_pe", "ckv_cache", "kpe_cache"), case.run_args(), strict=True))
    kw["out"] = torch.empty_like(case.q_nope)
    kw["lse"] = torch.empty(case.q_nope.shape[:2], device=device)
    fast = wrapper._common_call
    assert fast(wrapper._plan, **kw)
    assert fast(wrapper._plan, **{**kw, "out": None, "lse": None})
    change(kw)
    assert not fast(wrapper._plan, **kw)


def test_run_rejects_cache_without_indexed_pages(device: torch.device, workspace: torch.Tensor) -> None:
    """kv_indices is checked at run() against the pages the caches actually hold."""
    case = _case(device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*case.plan_args())
    ptr, lens = case.kv_indptr.tolist(), case.kv_len.tolist()
    used_pages = [p for b in range(3) for p in case.kv_indices[ptr[b]:ptr[b] + -(-lens[b] // 4)].tolist()]
    few = max(used_pages)  # the caches end just before the largest page a request reads
    _expect(ValueError, "kv_indices", lambda: wrapper.run(case.q_nope, case.q_pe, case.ckv_cache[:few],
                                                          case.kpe_cache[:few]), _case_tensors(case))
    # the sentinel entries after kv_indptr[-1] and the unused pages past kv_len are never read
    wrapper.run(case.q_nope, case.q_pe, case.ckv_cache[:few + 1], case.kpe_cache[:few + 1])


def test_run_rejects_inputs_of_another_plan(device: torch.device, workspace: torch.Tensor) -> None:
    """After a re-plan, run() checks against the new plan, not the old one."""
    old = _case(device)
    new = _case(device, kv_lens=[5, 7], num_heads=8, page_size=16, dtype=torch.float16)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*old.plan_args())
    wrapper.plan(*new.plan_args())
    watched = _case_tensors(old) + _case_tensors(new)
    _expect(TypeError, "q_nope", lambda: wrapper.run(*old.run_args()), watched)
    _expect(ValueError, "q_nope", lambda: wrapper.run(old.q_nope.half()[:, :8], old.q_pe.half()[:, :8],
                                                      *new.run_args()[2:]), watched)
    _expect(ValueError, "ckv_cache", lambda: wrapper.run(*new.run_args()[:2], old.ckv_cache.half(),
                                                         old.kpe_cache.half()), watched)
    wrapper.run(*new.run_args())


def test_successful_calls_modify_only_out_and_lse(device: torch.device, workspace: torch.Tensor) -> None:
    for packed in (False, True):
        case = _case(device, kv_lens=[300, 0, 19, 4], num_heads=4, qo_len=2, packed=packed)
        snap = Snapshot(_case_tensors(case))
        wrapper = BatchMLAPagedAttentionWrapper(workspace)
        for num_splits in (None, 1, 3):
            wrapper.plan(*case.plan_args(), num_splits=num_splits)
            wrapper.run(*case.run_args(), out=nan_like(case.q_nope), return_lse=True)
            wrapper.run(*case.run_args())
        snap.assert_unchanged()


# --------------------------------------------------------------------------------------------
# merge_states.
# --------------------------------------------------------------------------------------------


def _merge_inputs(device: torch.device) -> dict:
    return {"partial_out": torch.randn(3, 4, 2, 512, device=device),
                "partial_lse": torch.randn(3, 4, 2, device=device)}


def _merge_set(**values: object) -> Callable[[dict], None]:
    """Replace merge_states keywords; a callable value is applied to the valid keywords."""
    def change(kw: dict) -> None:
        kw.update({k: v(kw) if callable(v) else v for k, v in values.items()})
    return change


def _empty(*shape: int, dtype: torch.dtype = torch.float32) -> Callable[[dict], torch.Tensor]:
    return lambda kw: torch.empty(*shape, dtype=dtype, device=kw["partial_out"].device)


MERGE_ERRORS = [
    ("partial_out-bf16", _merge_set(partial_out=lambda kw: kw["partial_out"].bfloat16()), TypeError,
     "partial_out"),
    ("partial_out-rank3", _merge_set(partial_out=lambda kw: kw["partial_out"][0]), ValueError, "partial_out"),
    ("partial_out-no-parts", _merge_set(partial_out=lambda kw: kw["partial_out"][:0],
                                        partial_lse=lambda kw: kw["partial_lse"][:0]),
     ValueError, "partial_out"),
    ("partial_out-dim-500", _merge_set(partial_out=lambda kw: kw["partial_out"][..., :500]), ValueError,
     "partial_out"),
    ("partial_lse-fp16", _merge_set(partial_lse=lambda kw: kw["partial_lse"].half()), TypeError,
     "partial_lse"),
    ("partial_lse-shape", _merge_set(partial_lse=lambda kw: kw["partial_lse"][:2]), ValueError,
     "partial_lse"),
    ("out_dtype-float32", _merge_set(out_dtype=torch.float32), TypeError, "out_dtype"),
    ("out-shape", _merge_set(out=_empty(4, 2, 256, dtype=torch.bfloat16)), ValueError, "out"),
    ("out-fp32", _merge_set(out=_empty(4, 2, 512)), TypeError, "out"),
    ("lse-fp16", _merge_set(lse=_empty(4, 2, dtype=torch.half)), TypeError, "lse"),
    ("lse-shape", _merge_set(lse=_empty(4, 3)), ValueError, "lse"),
]


@pytest.mark.parametrize("change, exc, name", [m[1:] for m in MERGE_ERRORS], ids=[m[0] for m in MERGE_ERRORS])
def test_merge_states_rejects(change: Callable[[dict], None], exc: type[Exception], name: str,
                              device: torch.device) -> None:
    kw = _merge_inputs(device)
    change(kw)
    watched = [v for k, v in kw.items() if isinstance(v, torch.Tensor) and k not in ("out", "lse")]
    _expect(exc, name, lambda: merge_states(**kw), watched)


def test_merge_states_rejects_other_device(device: torch.device) -> None:
    kw = _merge_inputs(device)
    kw["partial_lse"] = torch.empty_like(kw["partial_lse"], device=_other_device(device))
    with pytest.raises(ValueError, match="partial_lse"):
        merge_states(**kw)
    kw = _merge_inputs(device)
    kw["out"] = torch.empty(4, 2, 512, dtype=torch.bfloat16, device=_other_device(device))
    with pytest.raises(ValueError, match="out"):
        merge_states(**kw)
