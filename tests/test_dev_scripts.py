"""The development scripts under benchmarks/ that run without a GPU do run there: the compute-sanitizer
workload (every kernel family's cases, checked here on the dense reference path) and the host-path probe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs it under compute-sanitizer instead")
def test_sanitize_workload_checks_every_family():
    out = _run("benchmarks/sanitize_kernels.py")
    assert out.strip().endswith("0 wrong results (cpu)")
    for family in ("N:M 8:32 V=64", "V=1", "split-K", "CSR", "bitmap", "block", "SDDMM depth 13", "SDDMM depth 96"):
        assert family in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="it stubs CUDA out: for machines without a GPU")
def test_host_path_probe_runs():
    out = _run("benchmarks/host_path_cpu.py", "--calls", "50")
    assert "SparseLinear, no grad:" in out and "SparseLinear, grad enabled:" in out
