"""nmspmm.sddmm, the sampled product on a CSR weight's structure (the op; its kernels are in test_kernels.py):
results against float64, the choice of the tiled kernel, and every bad-input error."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, TOLERANCE, csr_weight, relative_error
from nmspmm.formats.csr import CSRWeight
from nmspmm.kernels.sddmm import sddmm_tiled
from nmspmm.ops.csr import sddmm
from nmspmm.prune.unstructured import prune_csr

# On the CPU "triton" runs the kernels through the interpreter; "auto" there is the dense reference.
BACKENDS = ["auto", "triton"] if DEVICE == "cpu" else ["auto"]


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("backend", BACKENDS)
def test_csr_sddmm_op_long_reduction_takes_the_tiled_kernel(backend, monkeypatch):
    import nmspmm.ops.csr as csr_ops

    calls = []
    monkeypatch.setattr(csr_ops, "sddmm_tiled", lambda *args: calls.append(1) or sddmm_tiled(*args))
    weight = csr_weight(45, 70, torch.float16)
    a = torch.randn(45, 100, device=DEVICE).half()
    b = torch.randn(70, 100, device=DEVICE).half()
    expected = (a.double() @ b.double().t()) * weight.mask()
    assert relative_error(sddmm(a, b, weight, backend=backend).to_dense(), expected) < TOLERANCE[torch.float16]
    assert len(calls) == (1 if backend == "triton" or DEVICE == "cuda" else 0)


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity,tiled", [(0.5, True), (0.99, False)])
def test_csr_exact_fp32_sddmm_takes_the_tiled_kernel_unless_very_sparse(backend, sparsity, tiled, monkeypatch):
    import nmspmm.ops.csr as csr_ops

    calls = []
    monkeypatch.setattr(csr_ops, "sddmm_tiled", lambda *args: calls.append(args[-1]) or sddmm_tiled(*args))
    weight = prune_csr(torch.randn(64, 160, device=DEVICE), sparsity)
    a = torch.randn(64, 96, device=DEVICE)
    b = torch.randn(160, 96, device=DEVICE)
    expected = (a.double() @ b.double().t()) * weight.mask()
    assert relative_error(sddmm(a, b, weight, backend=backend).to_dense(), expected) < TOLERANCE[torch.float32]
    uses_kernels = backend == "triton" or DEVICE == "cuda"
    assert calls == (["tf32x3"] if tiled and uses_kernels else [])
    # The weight caches the tiled kernel's offsets only when that kernel runs.
    assert ("tile_offsets_64" in weight._derived) == (tiled and uses_kernels)


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("backend", BACKENDS)
def test_csr_sddmm_op(backend):
    weight = csr_weight(45, 70, torch.bfloat16)
    a = torch.randn(45, 13, device=DEVICE).bfloat16()
    b = torch.randn(13, 70, device=DEVICE).bfloat16().t()  # a transposed view: the op copies it tiled
    sampled = sddmm(a, b, weight, backend=backend)
    assert isinstance(sampled, CSRWeight) and sampled.dtype == torch.bfloat16
    assert sampled.col_indices is weight.col_indices and sampled.row_offsets is weight.row_offsets
    expected = (a.double() @ b.double().t()) * weight.mask()
    assert relative_error(sampled.to_dense(), expected) < TOLERANCE[torch.bfloat16]


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda w: (torch.randn(12, 5), torch.randn(20, 5), w.to_dense()), TypeError, r"weight: expected an nmspmm"),
        (lambda w: ([0.0], torch.randn(20, 5), w), TypeError, r"a: expected a torch.Tensor, got list"),
        (lambda w: (torch.randn(12, 5).half(), torch.randn(20, 5), w), TypeError, r"a: dtype torch.float16 does not"),
        (lambda w: (torch.randn(12, 5), torch.randn(20, 5).half(), w), TypeError, r"b: dtype torch.float16 does not"),
        (lambda w: (torch.randn(12, 5, device="meta"), torch.randn(20, 5), w), ValueError, r"a: on meta, but weight"),
        (lambda w: (torch.randn(11, 5), torch.randn(20, 5), w), ValueError, r"a: expected shape \[N=12, D\] with D"),
        (lambda w: (torch.randn(12, 5), torch.randn(20), w), ValueError, r"b: expected shape \[K=20, D\] with D >= 1"),
        (lambda w: (torch.randn(12, 0), torch.randn(20, 0), w), ValueError, r"a: expected shape \[N=12, D\] with D >="),
        (lambda w: (torch.randn(12, 5), torch.randn(20, 4), w), ValueError, r"b: expected D=5 columns like a"),
        (
            lambda w: (torch.randn(12, 5, requires_grad=True), torch.randn(20, 5), w),
            ValueError, r"a, b: sddmm is not differentiable",
        ),
    ],
)
def test_csr_sddmm_rejects_bad_input(make_args, error, match):
    a, b, weight = make_args(csr_weight(12, 20).cpu())
    with pytest.raises(error, match=match):
        sddmm(a, b, weight)
