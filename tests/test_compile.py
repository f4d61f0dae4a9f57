"""``torch.compile(fullgraph=True)`` traces ``BatchMLAPagedAttentionWrapper.run`` (a registered
``torch.library`` custom op) without graph breaks, and the compiled call gives bitwise the eager
result. Inductor needs a C++ compiler on the CPU; where none is found the test uses
``aot_eager`` (still the full dynamo + AOT autograd trace, ``fullgraph=True`` kept)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo.testing

from openmla import BatchMLAPagedAttentionWrapper
from openmla.testing import assert_attention_close, make_paged_case, nan_like


def _backend(device: torch.device) -> str:
    if device.type == "cuda" or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"):
        return "inductor"
    return "aot_eager"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("num_splits", [1, 3], ids=["direct", "split"])
def test_compiled_run_matches_eager(num_splits: int, device: torch.device, workspace: torch.Tensor) -> None:
    case = make_paged_case([37, 0, 5], 16, 16, qo_len=2, device=device)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    wrapper.plan(*case.plan_args(), num_splits=num_splits)
    out = nan_like(case.q_nope)
    lse = torch.full(case.q_nope.shape[:2], float("nan"), device=device)

    def into_buffers(q_nope, q_pe, ckv, kpe):
        return wrapper.run(q_nope, q_pe, ckv, kpe, out=out, lse=lse, return_lse=True)

    def allocating(q_nope, q_pe, ckv, kpe):
        return wrapper.run(q_nope, q_pe, ckv, kpe, return_lse=True)

    eager_out, eager_lse = (t.clone() for t in wrapper.run(*case.run_args(), return_lse=True))
    assert_attention_close(eager_out, eager_lse, case.reference(), case.lowp_reference())

    backend = _backend(device)
    compiled = torch.compile(into_buffers, fullgraph=True, backend=backend)
    got_out, got_lse = compiled(*case.run_args())
    assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse)
    assert torch.equal(got_out, eager_out) and torch.equal(got_lse, eager_lse)

    compiled_alloc = torch.compile(allocating, fullgraph=True, backend=backend)
    got_out, got_lse = compiled_alloc(*case.run_args())
    assert got_out.shape == eager_out.shape and got_out.dtype == eager_out.dtype
    assert torch.equal(got_out, eager_out) and torch.equal(got_lse, eager_lse)


def test_compiled_run_follows_replan(device: torch.device, workspace: torch.Tensor) -> None:
    """A model is compiled once and re-planned every step: the compiled call must use the new
    plan (new lengths and schedule, same batch and token count), never a stale one."""
    first = make_paged_case([37, 0, 5], 16, 16, device=device, seed=1)
    second = make_paged_case([3, 300, 64], 16, 16, device=device, seed=2)
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    compiled = torch.compile(
        lambda q_nope, q_pe, ckv, kpe: wrapper.run(q_nope, q_pe, ckv, kpe, return_lse=True),
        fullgraph=True, backend=_backend(device))
    for case, num_splits in ((first, None), (second, None), (second, 2), (first, 3)):
        wrapper.plan(*case.plan_args(), num_splits=num_splits)
        out, lse = compiled(*case.run_args())
        assert_attention_close(out, lse, case.reference(), case.lowp_reference())


class _DecodeLayer(torch.nn.Module):
    """How a model holds the wrapper: an attribute of the attention module."""

    def __init__(self, wrapper: BatchMLAPagedAttentionWrapper) -> None:
        super().__init__()
        self.wrapper = wrapper

    def forward(self, q_nope, q_pe, ckv, kpe):
        return self.wrapper.run(q_nope, q_pe, ckv, kpe, return_lse=True)


def test_replan_every_step_does_not_recompile(device: torch.device, workspace: torch.Tensor) -> None:
    """A serving engine re-plans before every decode step while its requests grow into new
    pages, and calls the compiled model in between. A new plan of the same batch must not cost
    a recompilation per step (with ``fullgraph=True`` dynamo raises FailOnRecompileLimitHit once
    its recompile limit, 8, is hit). One recompilation is allowed (dynamo marking a size dynamic)."""
    counter = torch._dynamo.testing.CompileCounterWithBackend(_backend(device))
    wrapper = BatchMLAPagedAttentionWrapper(workspace)
    compiled = torch.compile(_DecodeLayer(wrapper), fullgraph=True, backend=counter)
    case = make_paged_case([12, 40], 16, 1, device=device)
    # renumber the pages in the order the requests use them, as an allocator hands out new
    # pages: every step reads a page id no earlier step read
    used = case.kv_indices[: int(case.kv_indptr[-1])].long()
    case.ckv_cache, case.kpe_cache = case.ckv_cache[used], case.kpe_cache[used]
    case.kv_indices = torch.arange(used.numel(), dtype=torch.int32, device=device)
    for step in range(12):  # request 1 grows by one token (one page of size 1) per step
        case.kv_len = torch.tensor([12, 28 + step], dtype=torch.int32, device=device)
        wrapper.plan(*case.plan_args())
        out, lse = compiled(*case.run_args())
        assert_attention_close(out, lse, case.reference(), case.lowp_reference())
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 12 plans of one batch"
