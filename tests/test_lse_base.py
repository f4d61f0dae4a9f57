"""The LSE is the natural log (SPEC 1), pinned against scores computed here from the raw
tensors in float64 (not through ``openmla.reference``), and clearly apart from the base-2 LSE
that FlashInfer returns by default. Empty requests give exactly ``out = 0``, ``lse = -inf``."""

from __future__ import annotations

import math

import pytest
import torch

from openmla import BatchMLAPagedAttentionWrapper, merge_states

D_CKV, D_KPE = 512, 64
PAGE = 4


def _tiny_batch(device: torch.device) -> dict:
    """Two requests over a shuffled page-size-4 cache: 10 tokens, then 0 tokens."""
    gen = torch.Generator().manual_seed(11)
    num_heads, kv_len = 2, 10
    q = torch.randn(2, num_heads, D_CKV + D_KPE, generator=gen).bfloat16()  # one token per request
    tokens = torch.randn(kv_len, D_CKV + D_KPE, generator=gen).bfloat16()
    pages = [5, 0, 3]  # token t lives in page pages[t // 4], slot t % 4
    cache = torch.full((6, PAGE, D_CKV + D_KPE), float("nan")).bfloat16()
    for t in range(kv_len):
        cache[pages[t // PAGE], t % PAGE] = tokens[t]
    sm_scale = 0.09
    scores = sm_scale * (q[0].double() @ tokens.double().T)  # [H, kv_len], 576 dims at once
    return {
        "q": q.to(device), "cache": cache.to(device), "scores": scores, "num_heads": num_heads,
        "sm_scale": sm_scale,
        "qo_indptr": torch.tensor([0, 1, 2], dtype=torch.int32),
        "kv_indptr": torch.tensor([0, 3, 3], dtype=torch.int32),
        "kv_indices": torch.tensor(pages, dtype=torch.int32),
        "kv_len": torch.tensor([kv_len, 0], dtype=torch.int32),
    }


@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_lse_is_natural_log(num_splits: int | None, device: torch.device, workspace: torch.Tensor) -> None:
    b = _tiny_batch(device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(b["qo_indptr"], b["kv_indptr"], b["kv_indices"], b["kv_len"], b["num_heads"], D_CKV,
                 D_KPE, PAGE, False, b["sm_scale"], torch.bfloat16, torch.bfloat16, num_splits=num_splits)
    q, cache = b["q"], b["cache"]
    out, lse = wrapper.run(q[..., :D_CKV], q[..., D_CKV:], cache[..., :D_CKV], cache[..., D_CKV:],
                           return_lse=True)
    natural = torch.logsumexp(b["scores"], dim=-1)  # [H]
    base2 = natural / math.log(2)  # log2(sum_t exp(s_t)), FlashInfer's default
    assert (natural.abs() > 1).all(), "the case must tell the bases apart"
    got = lse[0].double().cpu()
    torch.testing.assert_close(got, natural, rtol=1e-5, atol=1e-5)
    assert ((got - base2).abs() > 0.3).all()

    # request 1 is empty: exactly zero output and -inf LSE, whatever the split count
    assert torch.isneginf(lse[1]).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_merge_lse_is_natural_log(device: torch.device) -> None:
    """Two parts with LSE 0 merge to log(e^0 + e^0) = ln 2, not log2(2) = 1."""
    part_out = torch.ones(2, 1, 1, 16, device=device)
    part_lse = torch.zeros(2, 1, 1, device=device)
    _, lse = merge_states(part_out, part_lse)
    assert lse.item() == pytest.approx(math.log(2), abs=1e-6)
