"""Test set-up: without a GPU, Triton kernels run under the CPU interpreter (set before triton loads)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative Frobenius-norm error allowed against a float64 reference.
TOLERANCE = {torch.float32: 1e-5, "tf32": 2e-3, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere gives inf."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    if not bool(torch.isfinite(actual).all()):
        return float("inf")
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
