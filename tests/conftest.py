"""Shared fixtures. Without a GPU the Triton kernels run through Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before ``openmla.kernels`` is imported (Triton reads it when
``@triton.jit`` runs), so it is set here, inline, before any test module imports openmla.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def workspace(device: torch.device) -> torch.Tensor:
    """A 64 MiB float workspace: room for 128 heads x 4 query tokens x 7 splits x 4 requests."""
    return torch.empty(64 << 20, dtype=torch.uint8, device=device)


@pytest.fixture
def gpu_workspace() -> torch.Tensor:
    """256 MiB on the GPU, for realistic shapes (GPU tests only)."""
    return torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
