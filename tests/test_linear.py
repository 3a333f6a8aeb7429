"""The products of every format: nmspmm.linear and linear_feature_major (N:M), csr_linear and
csr_linear_feature_major (CSR), block_shuffled_linear (block-shuffled): dispatch, shapes, strides, bias, empty
batches, and every bad-input error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmspmm
from conftest import DEVICE, TOLERANCE, block_weight, csr_weight, dense_reference, relative_error
from nmspmm.formats.csr import CSRWeight
from nmspmm.ops.block_shuffled import block_shuffled_linear
from nmspmm.ops.csr import csr_linear, csr_linear_feature_major, sddmm
from nmspmm.prune.block_shuffle import prune_block_shuffled
from nmspmm.training import SRSTELinear

# On the CPU "triton" runs the kernels through the interpreter; "auto" there is the dense reference.
BACKENDS = ["auto", "triton"] if DEVICE == "cpu" else ["auto"]
# The reference path by name in place of "auto" on the CPU (the block-shuffled tests).
REFERENCE_BACKENDS = ["reference", "triton"] if DEVICE == "cpu" else ["auto"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weight(rows: int, cols: int, pattern: str, vector: int, dtype: torch.dtype) -> nmspmm.NMSparseWeight:
    return nmspmm.prune(torch.randn(rows, cols, device=DEVICE).to(dtype), pattern, vector)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lead,rows,cols,pattern,vector",
    [
        ((1,), 64, 64, "2:4", 16),
        ((7,), 96, 128, "8:32", 32),
        ((2, 3, 5), 128, 64, "1:4", 64),
        ((11,), 128, 128, "4:64", 128),
        ((3, 3), 20, 32, "3:8", 1),
        ((3, 37), 20, 64, "2:8", 1),  # beyond DIRECT_TOKENS: bf16 and fp16 run on the dense expansion
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_reference(lead, rows, cols, pattern, vector, dtype, backend, with_bias):
    weight = _weight(rows, cols, pattern, vector, dtype)
    x = torch.randn(*lead, cols, device=DEVICE).to(dtype)
    bias = torch.randn(rows, device=DEVICE).to(dtype) if with_bias else None
    y = nmspmm.linear(x, weight, bias, backend=backend)
    assert y.shape == (*lead, rows) and y.dtype == dtype and y.is_contiguous()
    assert relative_error(y, dense_reference(x, weight, bias)) < TOLERANCE[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_strided_input(backend):
    weight = _weight(64, 64, "8:32", 32, torch.float32)
    wide = torch.randn(9, 128, device=DEVICE)
    x = wide[:, 1::2]
    assert not x.is_contiguous()
    y = nmspmm.linear(x, weight, backend=backend)
    assert relative_error(y, dense_reference(x, weight, None)) < TOLERANCE[torch.float32]
    transposed = torch.randn(64, 5, device=DEVICE).t()
    y = nmspmm.linear(transposed, weight, backend=backend)
    assert relative_error(y, dense_reference(transposed, weight, None)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vector,tokens", [(64, 13), (1, 13), (1, 100)])
def test_linear_feature_major(dtype, backend, vector, tokens):
    weight = _weight(64, 128, "4:32", vector, dtype)
    x = torch.randn(tokens, 128, device=DEVICE).to(dtype)
    bias = torch.randn(64, device=DEVICE).to(dtype)
    y_t = nmspmm.linear_feature_major(x.t().contiguous(), weight, bias, backend=backend)
    assert y_t.shape == (64, tokens) and y_t.is_contiguous()
    assert relative_error(y_t.t(), dense_reference(x, weight, bias)) < TOLERANCE[dtype]


@pytest.mark.skipif(DEVICE != "cpu", reason="tf32 rounding only shows on tensor cores")
def test_tf32_follows_matmul_precision():
    weight = _weight(64, 64, "8:32", 32, torch.float32)
    x = torch.randn(5, 64)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        y = nmspmm.linear(x, weight, backend="triton")
    finally:
        torch.set_float32_matmul_precision(previous)
    assert relative_error(y, dense_reference(x, weight, None)) < TOLERANCE["tf32"]


@pytest.mark.gpu
def test_tf32_on_gpu():
    weight = _weight(256, 512, "8:32", 64, torch.float32)
    x = torch.randn(333, 512, device=DEVICE)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        loose = relative_error(nmspmm.linear(x, weight), dense_reference(x, weight, None))
        torch.set_float32_matmul_precision("highest")
        exact = relative_error(nmspmm.linear(x, weight), dense_reference(x, weight, None))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert 1e-5 < loose < TOLERANCE["tf32"]
    assert exact < TOLERANCE[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 333, 4096])
@pytest.mark.parametrize("rows", [64, 192, 4096, 11008])
@pytest.mark.parametrize("pattern,vector", [("8:32", 64), ("2:4", 16), ("4:32", 32), ("16:32", 128), ("2:8", 1)])
def test_linear_large_shapes(tokens, rows, pattern, vector, dtype):
    if rows % vector:
        pytest.skip(f"V={vector} does not divide N={rows}")
    cols = 4096 if vector > 1 else 512
    weight = _weight(rows, cols, pattern, vector, dtype)
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype)
    bias = torch.randn(rows, device=DEVICE).to(dtype)
    y = nmspmm.linear(x, weight, bias)
    assert relative_error(y, dense_reference(x, weight, bias)) < TOLERANCE[dtype]


def test_cpu_triton_needs_interpreter(monkeypatch):
    weight = _weight(32, 32, "2:4", 16, torch.float32).cpu()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend: 'triton' on the CPU needs TRITON_INTERPRET=1"):
        nmspmm.linear(torch.randn(2, 32), weight, backend="triton")


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda w: (torch.randn(4, 64, dtype=torch.float64), w, None), TypeError, r"x: dtype torch.float64"),
        (lambda w: (torch.randn(4, 64).half(), w, None), TypeError, r"x: dtype torch.float16 does not match"),
        (lambda w: (torch.randn(4, 48), w, None), ValueError, r"x: expected last dimension K=64"),
        (lambda w: (torch.tensor(1.0), w, None), ValueError, r"x: expected last dimension K=64"),
        (lambda w: ([[1.0] * 64], w, None), TypeError, r"x: expected a torch.Tensor"),
        (lambda w: (torch.randn(4, 64), w.to_dense(), None), TypeError, r"weight: expected an nmspmm.NMSparseWeight"),
        (lambda w: (torch.randn(4, 64), w, torch.randn(31)), ValueError, r"bias: expected shape \(32,\)"),
        (lambda w: (torch.randn(4, 64), w, torch.randn(32).half()), TypeError, r"bias: dtype torch.float16"),
        (lambda w: (torch.randn(4, 64), w, [0.0] * 32), TypeError, r"bias: expected a torch.Tensor"),
        (lambda w: (torch.randn(4, 64, device="meta"), w, None), ValueError, r"x: on meta, but weight is on cpu"),
        (lambda w: (torch.randn(4, 64), w, torch.randn(32, device="meta")), ValueError, r"bias: on meta, but"),
    ],
)
def test_linear_rejects_bad_input(make_args, error, match):
    weight = _weight(32, 64, "2:4", 16, torch.float32).cpu()
    x, w, bias = make_args(weight)
    with pytest.raises(error, match=match):
        nmspmm.linear(x, w, bias)


def test_linear_rejects_unknown_backend():
    weight = _weight(32, 64, "2:4", 16, torch.float32)
    with pytest.raises(ValueError, match="backend: expected one of"):
        nmspmm.linear(torch.randn(2, 64, device=DEVICE), weight, backend="cublas")


def test_feature_major_rejects_row_major_shape():
    weight = _weight(32, 64, "2:4", 16, torch.float32)
    with pytest.raises(ValueError, match=r"x_t: expected first dimension K=64"):
        nmspmm.linear_feature_major(torch.randn(5, 64, device=DEVICE), weight)
    with pytest.raises(ValueError, match=r"x_t: expected a 2-D \[K, M\]"):
        nmspmm.linear_feature_major(torch.randn(64, 2, 2, device=DEVICE), weight)


@pytest.mark.gpu
def test_mixed_devices_rejected():
    weight = _weight(32, 64, "2:4", 16, torch.float32)
    with pytest.raises(ValueError, match="x: on cpu, but weight is on cuda"):
        nmspmm.linear(torch.randn(2, 64), weight)
    with pytest.raises(ValueError, match="bias: on cpu, but weight is on cuda"):
        nmspmm.linear(torch.randn(2, 64, device="cuda"), weight, torch.randn(32))


def _empty_batch_modules() -> list[object]:
    torch.manual_seed(0)
    dense = nn.Linear(64, 32, device=DEVICE)
    return [
        pytest.param(lambda: nmspmm.SparseLinear.from_dense(dense, "8:32", 16), id="nm-V16"),
        pytest.param(lambda: nmspmm.SparseLinear.from_dense(dense, "2:4", 1), id="nm-V1"),
        pytest.param(lambda: nmspmm.CSRLinear.from_dense(dense, 0.75), id="csr"),
        pytest.param(lambda: nmspmm.BlockShuffledLinear.from_dense(dense, 0.5, (16, 16), search=False), id="block"),
        pytest.param(lambda: SRSTELinear(dense, "2:4", decay=0.0), id="srste"),  # no decay: no gradient either
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", _empty_batch_modules())
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)])
def test_empty_batches_behave_like_nn_linear(make, backend, shape):
    # A mixture-of-experts layer may send no token to an expert: like nn.Linear, return [..., 0, N] and zero
    # gradients for the weights, without launching anything.
    module = make()
    module.backend = backend
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    y = module(x)
    assert y.shape == (*shape[:-1], 32)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and not bool(parameter.grad.any()), name
    with torch.no_grad():
        assert module(x).shape == (*shape[:-1], 32)


# ---- CSR: csr_linear and csr_linear_feature_major -----------------------------------------------------------


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,with_bias", [((1,), True), ((2, 3), False)])
def test_csr_linear(backend, lead, with_bias):
    weight = csr_weight(45, 70, torch.float16)
    x = torch.randn(*lead, 70, device=DEVICE).half()
    bias = torch.randn(45, device=DEVICE).half() if with_bias else None
    y = csr_linear(x, weight, bias, backend=backend)
    assert y.shape == (*lead, 45) and y.dtype == torch.float16 and y.is_contiguous()
    assert relative_error(y, dense_reference(x, weight, bias)) < TOLERANCE[torch.float16]


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("backend", BACKENDS)
def test_csr_linear_feature_major_and_strided(backend):
    weight = csr_weight(21, 70)
    bias = torch.randn(21, device=DEVICE)
    x = torch.randn(9, 140, device=DEVICE)[:, ::2]  # no unit stride anywhere
    y_t = csr_linear_feature_major(x.t(), weight, bias, backend=backend)
    assert y_t.shape == (21, 9) and y_t.is_contiguous()
    assert relative_error(y_t.t(), dense_reference(x, weight, bias)) < TOLERANCE[torch.float32]
    y = csr_linear(x, weight, bias, backend=backend)
    assert relative_error(y, dense_reference(x, weight, bias)) < TOLERANCE[torch.float32]
    empty = CSRWeight.from_dense(torch.randn(6, 70, device=DEVICE), torch.zeros(6, 70, dtype=torch.bool, device=DEVICE))
    assert torch.equal(csr_linear(x, empty, bias[:6], backend=backend), bias[:6].expand(9, 6))


@pytest.mark.usefixtures("seeded")
def test_csr_cpu_triton_needs_interpreter(monkeypatch):
    weight = csr_weight(8, 10).cpu()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend: 'triton' on the CPU needs TRITON_INTERPRET=1"):
        csr_linear(torch.randn(2, 10), weight, backend="triton")


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda w: (torch.randn(4, 20).double(), w, None), TypeError, r"x: dtype torch.float64 does not match"),
        (lambda w: (torch.randn(4, 19), w, None), ValueError, r"x: expected last dimension K=20"),
        (lambda w: (torch.tensor(1.0), w, None), ValueError, r"x: expected last dimension K=20"),
        (lambda w: ([[1.0] * 20], w, None), TypeError, r"x: expected a torch.Tensor"),
        (lambda w: (torch.randn(4, 20, device="meta"), w, None), ValueError, r"x: on meta, but weight is on cpu"),
        (lambda w: (torch.randn(4, 20), w.to_dense(), None), TypeError, r"weight: expected an nmspmm.CSRWeight"),
        (lambda w: (torch.randn(4, 20), w, torch.randn(11)), ValueError, r"bias: expected shape \(12,\)"),
        (lambda w: (torch.randn(4, 20), w, torch.randn(12).half()), TypeError, r"bias: dtype torch.float16"),
    ],
)
def test_csr_linear_rejects_bad_input(make_args, error, match):
    x, weight, bias = make_args(csr_weight(12, 20).cpu())
    with pytest.raises(error, match=match):
        csr_linear(x, weight, bias)


@pytest.mark.usefixtures("seeded")
def test_csr_bad_backend():
    weight = csr_weight(12, 20)
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        csr_linear(torch.randn(4, 20, device=DEVICE), weight, backend="dense")
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        sddmm(torch.randn(12, 3, device=DEVICE), torch.randn(20, 3, device=DEVICE), weight, backend="dense")


@pytest.mark.usefixtures("seeded")
def test_csr_linear_feature_major_rejects_bad_input():
    weight = csr_weight(12, 20)
    with pytest.raises(ValueError, match=r"x_t: expected first dimension K=20"):
        csr_linear_feature_major(torch.randn(4, 20, device=DEVICE), weight)
    with pytest.raises(ValueError, match=r"x_t: expected a 2-D \[K, M\] feature-major tensor"):
        csr_linear_feature_major(torch.randn(20, 2, 3, device=DEVICE), weight)


# ---- block-shuffled: block_shuffled_linear ------------------------------------------------------------------


@pytest.mark.parametrize("backend", REFERENCE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_shuffled_linear_matches_reference(dtype, backend):
    sparse, _, _ = block_weight(48, 80, (16, 16), dtype, density=0.5, empty_block_rows=(1,), device=DEVICE)
    x = torch.randn(2, 3, 80, device=DEVICE).to(dtype)
    bias = torch.randn(48, device=DEVICE).to(dtype)
    y = block_shuffled_linear(x, sparse, bias, backend=backend)
    assert y.shape == (2, 3, 48) and y.dtype == dtype and y.is_contiguous()
    assert relative_error(y, dense_reference(x, sparse, bias)) < TOLERANCE[dtype]


@pytest.mark.gpu
def test_block_shuffled_prune_and_product_on_gpu():
    weight = torch.randn(1024, 512, device="cuda")
    sparse = prune_block_shuffled(weight, 0.75, (32, 32))
    assert sparse.device.type == "cuda"
    x = torch.randn(77, 512, device="cuda")
    assert relative_error(block_shuffled_linear(x, sparse), dense_reference(x, sparse, None)) < TOLERANCE["tf32"]


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda w: (torch.randn(4, 64).half(), w, None), TypeError, r"x: dtype torch.float16 does not match"),
        (lambda w: (torch.randn(4, 48), w, None), ValueError, r"x: expected last dimension K=64"),
        (lambda w: ([[1.0] * 64], w, None), TypeError, r"x: expected a torch.Tensor"),
        (lambda w: (torch.randn(4, 64), w.to_dense(), None), TypeError, r"weight: expected an nmspmm.BlockShuffled"),
        (lambda w: (torch.randn(4, 64), w, torch.randn(31)), ValueError, r"bias: expected shape \(32,\)"),
        (lambda w: (torch.randn(4, 64), w, torch.randn(32).half()), TypeError, r"bias: dtype torch.float16"),
        (lambda w: (torch.randn(4, 64, device="meta"), w, None), ValueError, r"x: on meta, but weight is on cpu"),
    ],
)
def test_block_shuffled_linear_rejects_bad_input(make_args, error, match):
    sparse, _, _ = block_weight(32, 64, (16, 16))
    x, weight, bias = make_args(sparse)
    with pytest.raises(error, match=match):
        block_shuffled_linear(x, weight, bias)
    with pytest.raises(ValueError, match="backend: expected one of"):
        block_shuffled_linear(torch.randn(2, 64), sparse, backend="cublas")
