"""The merge property: attention over the whole KV equals the LSE-merge of attention over the
parts of any partition of it.

Partial states are computed by the float64 oracle (``mla_decode_reference``) over page-size-1
"caches" whose ``kv_indices`` pick each part's tokens, so a part can be any subset of the keys
(contiguous ranges, scattered tokens, or nothing), then merged by ``openmla.merge_states``. The
result is compared with the oracle over all keys. The merge's inputs are exact to fp32, so the
only error allowed is fp32 arithmetic plus the final rounding to the output dtype.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from openmla import merge_states
from openmla.reference import mla_decode_reference
from openmla.testing import nan_like

D_CKV, D_KPE = 512, 64


def _attention(q: torch.Tensor, kv: torch.Tensor, tokens: torch.Tensor, sm_scale: float,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle attention of every query row over the keys ``kv[tokens]`` (one request, page 1).

    q: ``[T, H, 576]``, kv: ``[N, 576]`` -> ``out [T, H, 512]`` and ``lse [T, H]`` in float64."""
    num_tokens = q.shape[0]
    cache = kv[:, None, :]  # [N, 1, 576]: one token per page
    i32 = {"dtype": torch.int32}
    return mla_decode_reference(
        q[..., :D_CKV], q[..., D_CKV:], cache[..., :D_CKV], cache[..., D_CKV:],
        qo_indptr=torch.tensor([0, num_tokens], **i32),
        kv_indptr=torch.tensor([0, tokens.numel()], **i32),
        kv_indices=tokens.to(torch.int32),
        kv_len=torch.tensor([tokens.numel()], **i32),
        page_size=1, sm_scale=sm_scale, causal=False)


def _random_partition(num_keys: int, num_parts: int, contiguous: bool, gen: torch.Generator,
                      ) -> list[torch.Tensor]:
    """``num_parts`` disjoint token sets covering ``range(num_keys)``; some may be empty."""
    if contiguous:
        cuts = torch.randint(0, num_keys + 1, (num_parts - 1,), generator=gen).sort().values.tolist()
        bounds = [0, *cuts, num_keys]
        return [torch.arange(lo, hi) for lo, hi in itertools.pairwise(bounds)]
    owner = torch.randint(0, num_parts, (num_keys,), generator=gen)
    return [torch.nonzero(owner == s).flatten() for s in range(num_parts)]


def _check_merged(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor, ref_lse: torch.Tensor) -> None:
    out, lse = out.cpu(), lse.cpu()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    eps = torch.finfo(out.dtype).eps  # rounding to the output dtype: at most eps / 2 relative
    torch.testing.assert_close(out.double(), ref_out, rtol=eps, atol=1e-5)
    torch.testing.assert_close(lse.double()[~empty], ref_lse[~empty], rtol=1e-6, atol=1e-5)


# 1, 2, 3, 7 parts as a split decode makes them; 8, 9 and 20 cross the steps of 8 or 16 pieces of
# the GPU configs (tests/test_reduce.py runs every config with several steps on the CPU too).
PART_COUNTS = [1, 2, 3, 7, 8, 9, 20]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("contiguous", [True, False], ids=["ranges", "scattered"])
@pytest.mark.parametrize("num_parts", PART_COUNTS)
def test_merge_of_partition_equals_whole(num_parts: int, contiguous: bool, seed: int,
                                         device: torch.device) -> None:
    gen = torch.Generator().manual_seed(1000 * num_parts + 10 * seed + contiguous)
    num_tokens, num_heads = 2, 5  # 5 heads: not a multiple of any head block
    num_keys = int(torch.randint(1, 40, (1,), generator=gen))
    q = torch.randn(num_tokens, num_heads, D_CKV + D_KPE, generator=gen).bfloat16()
    kv = torch.randn(num_keys, D_CKV + D_KPE, generator=gen).bfloat16()
    sm_scale = 1 / (D_CKV + D_KPE) ** 0.5 * (1 + seed)  # larger scales: peakier softmax

    parts = _random_partition(num_keys, num_parts, contiguous, gen)
    if num_parts > 1 and seed % 2:
        parts[seed % num_parts] = torch.arange(0)  # always an empty part on odd seeds
        parts[(seed + 1) % num_parts] = torch.arange(num_keys)
        for s in range(num_parts):
            if s not in (seed % num_parts, (seed + 1) % num_parts):
                parts[s] = torch.arange(0)
    assert sorted(torch.cat(parts).tolist()) == list(range(num_keys))

    states = [_attention(q, kv, tokens, sm_scale) for tokens in parts]
    part_out = torch.stack([o for o, _ in states]).float().to(device)  # [S, T, H, 512]
    part_lse = torch.stack([s for _, s in states]).float().to(device)  # [S, T, H]
    for (o, s), tokens in zip(states, parts, strict=True):
        if tokens.numel() == 0:  # what an empty part looks like
            assert torch.isneginf(s).all() and torch.equal(o, torch.zeros_like(o))

    ref_out, ref_lse = _attention(q, kv, torch.arange(num_keys), sm_scale)
    for out_dtype in (torch.bfloat16, torch.float16):
        out, lse = merge_states(part_out, part_lse, out_dtype=out_dtype)
        assert out.dtype == out_dtype and lse.dtype == torch.float32
        assert out.shape == (num_tokens, num_heads, D_CKV) and lse.shape == (num_tokens, num_heads)
        _check_merged(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("num_parts", PART_COUNTS)
def test_all_empty_rows(num_parts: int, device: torch.device) -> None:
    """Rows whose every part saw no key give out = 0 and lse = -inf, never NaN; the other rows
    of the same call are merged as usual."""
    gen = torch.Generator().manual_seed(num_parts)
    num_tokens, num_heads = 4, 5
    part_out = torch.randn(num_parts, num_tokens, num_heads, D_CKV, generator=gen)
    part_lse = torch.randn(num_parts, num_tokens, num_heads, generator=gen) * 3
    empty = torch.zeros(num_tokens, num_heads, dtype=torch.bool)
    empty[0] = True  # a whole token
    empty[2, ::2] = True  # scattered heads
    part_lse[:, empty] = float("-inf")
    part_out[:, empty] = 0.0
    if num_parts > 1:  # and some parts empty in rows that are not
        part_lse[0, 1] = float("-inf")
        part_out[0, 1] = 0.0

    ref_lse = torch.logsumexp(part_lse.double(), dim=0)
    w = torch.exp(part_lse.double() - torch.where(empty, 0.0, ref_lse))  # [S, T, H]
    ref_out = torch.where(empty[..., None], 0.0, (w[..., None] * part_out.double()).sum(0))

    out = nan_like(torch.empty(num_tokens, num_heads, D_CKV, dtype=torch.bfloat16, device=device))
    lse = torch.full((num_tokens, num_heads), float("nan"), device=device)
    got_out, got_lse = merge_states(part_out.to(device), part_lse.to(device), out=out, lse=lse)
    assert got_out is out and got_lse is lse
    assert torch.equal(out.cpu()[empty], torch.zeros_like(out.cpu()[empty]))
    assert torch.isneginf(lse.cpu()[empty]).all()
    _check_merged(out, lse, ref_out, ref_lse)


def test_single_part_is_identity(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(7)
    part_out = torch.randn(1, 5, 3, D_CKV, generator=gen)
    part_lse = torch.randn(1, 5, 3, generator=gen)
    part_lse[0, 2, 1] = float("-inf")
    part_out[0, 2, 1] = 0.0
    out, lse = merge_states(part_out.to(device), part_lse.to(device), out_dtype=torch.float16)
    assert torch.equal(out.cpu(), part_out[0].half())
    assert torch.equal(lse.cpu(), part_lse[0])


def test_merge_does_not_modify_partials(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(3)
    part_out = torch.randn(3, 2, 16, D_CKV, generator=gen).to(device)
    part_lse = torch.randn(3, 2, 16, generator=gen).to(device)
    part_lse[1, 0] = float("-inf")
    before = part_out.clone(), part_lse.clone()
    merge_states(part_out, part_lse)
    assert torch.equal(part_out, before[0]) and torch.equal(part_lse, before[1])


def test_strided_destinations(device: torch.device) -> None:
    """``out``/``lse`` views whose last stride is not 1: merge_states must either reject them
    (ValueError naming the argument, as the decode wrapper does) or write them correctly; it
    must never write outside the view."""
    gen = torch.Generator().manual_seed(5)
    part_out = torch.randn(3, 4, 20, 64, generator=gen).to(device)
    part_lse = torch.randn(3, 4, 20, generator=gen).to(device)
    ref_out, ref_lse = merge_states(part_out, part_lse)

    wide = torch.full((4, 20, 128), float("nan"), dtype=torch.bfloat16, device=device)
    try:
        out, _ = merge_states(part_out, part_lse, out=wide[..., ::2])
    except ValueError as e:
        assert "out" in str(e)
    else:
        assert torch.equal(out, ref_out)
    assert torch.isnan(wide[..., 1::2]).all(), "wrote outside out's view"

    lse_t = torch.full((20, 4), float("nan"), device=device)
    try:
        _, lse = merge_states(part_out, part_lse, lse=lse_t.T)
    except ValueError as e:
        assert "lse" in str(e)
    else:
        assert torch.equal(lse, ref_lse)
