"""Test data and checks shared by the tests, the benchmarks and ``python -m openmla``.

:func:`make_paged_case` builds adversarial paged batches: pages scattered by a random
permutation, NaN in every cache slot no request owns (whole spare pages and the tails of last
pages), extra index entries inside a request's page range that point at NaN pages, and
out-of-range sentinels after ``kv_indptr[-1]``. :func:`assert_attention_close` is the one
tolerance rule: the kernel's error against the float64 oracle may be at most twice that of a
plain torch implementation of the same formula (float32 arithmetic on the same 16-bit inputs,
output rounded to the query dtype), plus half a rounding step of the output dtype, and the
positions of ``-inf`` LSEs match. A torch implementation that does the softmax in bf16 errs
~5x more; the float32 one keeps the budget tight enough to catch one dropped token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from openmla.reference import (
    dequantize_ds_mla_reference,
    mla_decode_reference,
    quantize_ds_mla_reference,
)

D_CKV, D_KPE = 512, 64
SENTINEL_PAGE = 2**31 - 1  # in kv_indices entries after kv_indptr[-1]: never read


@dataclass
class PagedCase:
    q_nope: torch.Tensor  # [T, H, 512]
    q_pe: torch.Tensor  # [T, H, 64]
    ckv_cache: torch.Tensor  # [P, page_size, 512]
    kpe_cache: torch.Tensor  # [P, page_size, 64]
    qo_indptr: torch.Tensor  # [B + 1] int32
    kv_indptr: torch.Tensor  # [B + 1] int32
    kv_indices: torch.Tensor  # [>= kv_indptr[-1]] int32
    kv_len: torch.Tensor  # [B] int32
    page_size: int
    sm_scale: float
    causal: bool

    @property
    def num_heads(self) -> int:
        return self.q_nope.shape[1]

    def plan_args(self) -> tuple:
        """Positional arguments of ``BatchMLAPagedAttentionWrapper.plan``."""
        return (self.qo_indptr, self.kv_indptr, self.kv_indices, self.kv_len, self.num_heads,
                D_CKV, D_KPE, self.page_size, self.causal, self.sm_scale, self.q_nope.dtype,
                self.ckv_cache.dtype)

    def run_args(self) -> tuple:
        return (self.q_nope, self.q_pe, self.ckv_cache, self.kpe_cache)

    def reference(self, compute_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        return mla_decode_reference(
            self.q_nope, self.q_pe, self.ckv_cache, self.kpe_cache, self.qo_indptr,
            self.kv_indptr, self.kv_indices, self.kv_len, self.page_size, self.sm_scale,
            self.causal, compute_dtype)

    def lowp_reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tolerance yardstick: float32 arithmetic, output rounded to the query dtype."""
        out, lse = self.reference(torch.float32)
        return out.to(self.q_nope.dtype), lse


def make_paged_case(
    kv_lens: list[int],
    num_heads: int,
    page_size: int,
    *,
    qo_len: int | list[int] = 1,
    causal: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    packed: bool = False,
    extra_pages: int = 1,
    spare_pages: int = 3,
    seed: int = 0,
) -> PagedCase:
    """A random paged batch with NaN wherever no request owns the slot.

    Args:
        kv_lens: tokens of each request (0 allowed).
        qo_len: query tokens per request (one value for all, or one per request).
        packed: ckv/kpe are strided views of one ``[P, page_size, 576]`` buffer.
        extra_pages: index entries per request beyond the pages its kv_len needs, pointing at
            NaN pages (a kernel that reads past kv_len produces NaN).
        spare_pages: NaN pages nobody indexes.
    """
    g = torch.Generator().manual_seed(seed)
    batch = len(kv_lens)
    qo_lens = [qo_len] * batch if isinstance(qo_len, int) else list(qo_len)
    pages_needed = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(pages_needed) + spare_pages + batch * extra_pages
    perm = torch.randperm(num_pages, generator=g).tolist()
    nan_pages = perm[sum(pages_needed):]

    width = D_CKV + D_KPE
    cache = torch.full((num_pages, page_size, width), float("nan"), dtype=dtype)
    indices: list[int] = []
    kv_indptr = [0]
    taken = 0
    for b, n in enumerate(kv_lens):
        own = perm[taken: taken + pages_needed[b]]
        taken += pages_needed[b]
        for p, page in enumerate(own):
            fill = min(page_size, n - p * page_size)
            cache[page, :fill] = torch.randn(fill, width, generator=g).to(dtype)
        filler = [nan_pages[(b * extra_pages + k) % len(nan_pages)] for k in range(extra_pages)]
        indices += own + filler
        kv_indptr.append(len(indices))
    indices += [SENTINEL_PAGE] * 3

    if packed:
        storage = cache.to(device)
        ckv, kpe = storage[..., :D_CKV], storage[..., D_CKV:]
    else:
        ckv = cache[..., :D_CKV].contiguous().to(device)
        kpe = cache[..., D_CKV:].contiguous().to(device)
    num_tokens = sum(qo_lens)
    qo_indptr = [0]
    for q in qo_lens:
        qo_indptr.append(qo_indptr[-1] + q)
    q = torch.randn(num_tokens, num_heads, width, generator=g).to(dtype)

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return PagedCase(
        q_nope=q[..., :D_CKV].contiguous().to(device),
        q_pe=q[..., D_CKV:].contiguous().to(device),
        ckv_cache=ckv,
        kpe_cache=kpe,
        qo_indptr=i32(qo_indptr),
        kv_indptr=i32(kv_indptr),
        kv_indices=i32(indices),
        kv_len=i32(kv_lens),
        page_size=page_size,
        sm_scale=1.0 / (width**0.5),
        causal=causal,
    )


def batch_case(params: tuple, device: str | torch.device) -> PagedCase:
    """A case from ``(kv_lens, heads, page, qo_len, causal, dtype, num_splits, packed)`` (the GPU
    test tables; ``num_splits`` is the caller's): with ``causal`` a request gets at most its
    length in query tokens. The seed follows the shape."""
    kv_lens, heads, page, qo_len, causal, dtype, _, packed = params
    qo = [min(qo_len, n) if causal else qo_len for n in kv_lens]
    return make_paged_case(kv_lens, heads, page, qo_len=qo, causal=causal, dtype=dtype, device=device,
                           packed=packed, seed=heads + page + len(kv_lens))


def batch_case_id(params: tuple) -> str:
    """A test id for :func:`batch_case`'s tuple."""
    lens, h, page, q, causal, dtype, splits, packed = params
    return "-".join([f"B{len(lens)}", f"H{h}", f"P{page}", f"Q{q}"] + (["causal"] if causal else [])
                    + ["Sauto" if splits is None else f"S{splits}",
                       "bf16" if dtype == torch.bfloat16 else "fp16"] + (["packed"] if packed else []))


def to_fp8_ds_mla(case: PagedCase) -> tuple[torch.Tensor, PagedCase]:
    """The case's cache as DeepSeek V3.2 656-byte rows (``uint8 [P, page, 656]``, quantised by
    the torch reference; NaN slots stay NaN), and the case over the dequantised cache in the
    query dtype, which is the oracle's input (the kernel computes on exactly that cache)."""
    num_pages, page_size, _ = case.ckv_cache.shape
    rows = quantize_ds_mla_reference(case.ckv_cache.reshape(-1, D_CKV).cpu(),
                                     case.kpe_cache.reshape(-1, D_KPE).cpu())
    kv = rows.view(num_pages, page_size, -1).to(case.ckv_cache.device)
    ckv, kpe = dequantize_ds_mla_reference(kv)
    dtype = case.q_nope.dtype
    return kv, replace(case, ckv_cache=ckv.to(dtype), kpe_cache=kpe.to(dtype))


def to_fp8_per_tensor(case: PagedCase, scale: float) -> tuple[torch.Tensor, torch.Tensor, PagedCase]:
    """The case's caches as float8 e4m3 codes with one scale (value = code * scale), and the case
    over the exactly dequantised cache (float32), the oracle's input."""
    def quant(t: torch.Tensor) -> torch.Tensor:
        return (t.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)

    ckv8, kpe8 = quant(case.ckv_cache), quant(case.kpe_cache)
    return ckv8, kpe8, replace(case, ckv_cache=ckv8.float() * scale, kpe_cache=kpe8.float() * scale)


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """A NaN-poisoned buffer for outputs the library must overwrite entirely."""
    return torch.full_like(t, float("nan"))


def assert_attention_close(
    out: torch.Tensor,
    lse: torch.Tensor,
    ref: tuple[torch.Tensor, torch.Tensor],
    lowp: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, float]:
    """Check ``(out, lse)`` against the float64 oracle ``ref`` with a budget set by ``lowp``
    (:meth:`PagedCase.lowp_reference`). Returns the measured errors."""
    ref_out, ref_lse = (t.double().cpu() for t in ref)
    lp_out, lp_lse = (t.double().cpu() for t in lowp)
    got_out, got_lse = out.double().cpu(), lse.double().cpu()
    assert not torch.isnan(got_out).any(), "out has NaN"
    assert not torch.isnan(got_lse).any(), "lse has NaN"
    assert not torch.isinf(got_out).any(), "out has inf"
    ref_empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(got_lse), ref_empty), "lse = -inf at other positions than the reference"
    assert not torch.isposinf(got_lse).any(), "lse has +inf"

    ulp = torch.finfo(out.dtype).eps if out.dtype.is_floating_point else 0.0
    scale = max(1.0, float(ref_out.abs().max())) if ref_out.numel() else 1.0
    err_out = float((got_out - ref_out).abs().max()) if ref_out.numel() else 0.0
    lp_err_out = float((lp_out - ref_out).abs().max()) if ref_out.numel() else 0.0
    budget_out = 2 * lp_err_out + 0.5 * ulp * scale
    assert err_out <= budget_out, f"out error {err_out:.3e} > budget {budget_out:.3e} (low-precision torch {lp_err_out:.3e})"

    finite = ~ref_empty
    err_lse = float((got_lse - ref_lse)[finite].abs().max()) if finite.any() else 0.0
    lp_err_lse = float((lp_lse - ref_lse)[finite].abs().max()) if finite.any() else 0.0
    lse_scale = max(1.0, float(ref_lse[finite].abs().max())) if finite.any() else 1.0
    budget_lse = 2 * lp_err_lse + 1e-5 * lse_scale
    assert err_lse <= budget_lse, f"lse error {err_lse:.3e} > budget {budget_lse:.3e} (low-precision torch {lp_err_lse:.3e})"
    return {"out_err": err_out, "out_budget": budget_out, "lse_err": err_lse, "lse_budget": budget_lse}


def run_and_check(wrapper, case: PagedCase, num_splits: int | None = None, deterministic: bool = False,
                  expect_backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan ``case`` on ``wrapper``, run it into NaN-poisoned ``out`` / ``lse`` and check them
    against the oracle (:func:`assert_attention_close`); ``expect_backend``: the kernel the plan
    must pick. Returns ``(out, lse)``."""
    wrapper.plan(*case.plan_args(), num_splits=num_splits, deterministic=deterministic)
    if expect_backend is not None:
        assert wrapper.backend == expect_backend
    out = nan_like(case.q_nope)
    lse = torch.full(case.q_nope.shape[:2], float("nan"), device=case.q_nope.device)
    wrapper.run(*case.run_args(), out=out, lse=lse, return_lse=True)
    if out.is_cuda:
        torch.cuda.synchronize()
    assert_attention_close(out, lse, case.reference(), case.lowp_reference())
    return out, lse


def run_and_check_ds_mla(wrapper, case: PagedCase, num_splits: int | None = None, deterministic: bool = False,
                         expect_backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``case`` over its cache as 656-byte fp8 rows (:func:`to_fp8_ds_mla`): planned with
    ``kv_data_type=torch.uint8``, run into NaN-poisoned ``out`` / ``lse``, checked against the
    oracle on the dequantised cache (the kernel computes on exactly it) and, within the
    quantisation bound of DESIGN.md "FP8 decode" (``2**-3 * max|ckv|`` for randn caches: e4m3
    rounds each value to ``2**-4`` relative, and the scores move with K's error), on the
    unquantised one; the cache must be left as it was. Returns ``(out, lse)``."""
    kv, deq = to_fp8_ds_mla(case)
    kv_before = kv.clone()
    args = list(case.plan_args())
    args[-1] = torch.uint8
    wrapper.plan(*args, num_splits=num_splits, deterministic=deterministic)
    if expect_backend is not None:
        assert wrapper.backend == expect_backend
    out = nan_like(case.q_nope)
    lse = torch.full(case.q_nope.shape[:2], float("nan"), device=case.q_nope.device)
    wrapper.run(case.q_nope, case.q_pe, kv, None, out=out, lse=lse)
    if out.is_cuda:
        torch.cuda.synchronize()
    assert_attention_close(out, lse, deq.reference(), deq.lowp_reference())
    assert torch.equal(kv, kv_before)
    used = torch.nan_to_num(case.ckv_cache.float(), nan=0.0)
    assert float((out.double() - case.reference()[0].double()).abs().max()) <= 2.0**-3 * float(used.abs().max())
    return out, lse
