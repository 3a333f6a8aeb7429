"""Gradients through the products of every format (nmspmm.linear, csr_linear, block_shuffled_linear): for x
(dY @ W) and for the kept weights only (SDDMM), against dense masked gradients; gradcheck in float64 on the
reference path; the backward structures a CSR weight derives on demand."""

from __future__ import annotations

import pytest
import torch

import nmspmm
from nmspmm.formats.block_shuffled import BlockShuffledWeight
from nmspmm.ops import nm_linear_op
from nmspmm.ops.block_shuffled import block_shuffled_linear, block_shuffled_linear_op
from nmspmm.ops.csr import csr_linear, csr_linear_op
from nmspmm.prune.unstructured import prune_csr
from conftest import (
    DEVICE, TOLERANCE, bitmap_weight, block_op_args, block_weight, csr_op_args, csr_weight, relative_error,
)

BACKENDS = ["reference", "triton"] if DEVICE == "cpu" else ["auto"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_gradcheck_reference_float64():
    weight = nmspmm.prune(torch.randn(32, 64, dtype=torch.float32), "2:8", 16)
    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    values = weight.values.double().requires_grad_()
    bias = torch.randn(32, dtype=torch.float64, requires_grad=True)
    offsets = weight.kept_offsets()
    assert torch.autograd.gradcheck(
        lambda x, v, b: nm_linear_op(x, v, offsets, b, weight.n, weight.m, weight.vector, "reference"),
        (x, values, bias),
    )


def test_gradcheck_eager_autograd_function_float64():
    # Eager calls with a gradient run a torch.autograd.Function built from the op's own setup and backward.
    from nmspmm.ops import nm as nm_ops
    from nmspmm.ops.backend import call_op

    weight = nmspmm.prune(torch.randn(32, 64, dtype=torch.float32), "2:8", 16)
    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    values = weight.values.double().requires_grad_()
    bias = torch.randn(32, dtype=torch.float64, requires_grad=True)
    offsets = weight.kept_offsets()
    seen = []
    original = nm_ops._NM_LINEAR.eager_autograd.apply

    def counting(*args):
        seen.append(len(args))
        return original(*args)

    eager = nm_ops._NM_LINEAR._replace(eager_autograd=type("Counted", (), {"apply": staticmethod(counting)}))
    assert torch.autograd.gradcheck(
        lambda x, v, b: call_op(eager, (x, v, offsets, b, weight.n, weight.m, weight.vector, "reference", None)),
        (x, values, bias),
    )
    assert seen and set(seen) == {10}  # the op's 9 arguments and what runs the forward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern,vector", [("8:32", 32), ("2:4", 16), ("3:8", 1), ("13:16", 64)])
@pytest.mark.parametrize("feature_major", [False, True])
def test_gradients_match_dense_masked(pattern, vector, dtype, backend, feature_major):
    rows, cols, tokens = 64, 64, 9
    weight = nmspmm.prune(torch.randn(rows, cols, device=DEVICE).to(dtype), pattern, vector)
    mask = weight.mask()
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype)
    bias = torch.randn(rows, device=DEVICE).to(dtype)
    grad_y = torch.randn(tokens, rows, device=DEVICE).to(dtype)

    x_in = (x.t().contiguous() if feature_major else x.clone()).requires_grad_()
    values = weight.values.clone().requires_grad_()
    bias_in = bias.clone().requires_grad_()
    sparse = nmspmm.NMSparseWeight._trusted(values, weight.offsets, weight.pattern, vector, weight.shape)
    if feature_major:
        nmspmm.linear_feature_major(x_in, sparse, bias_in, backend=backend).backward(grad_y.t())
        grad_x = x_in.grad.t()
    else:
        nmspmm.linear(x_in, sparse, bias_in, backend=backend).backward(grad_y)
        grad_x = x_in.grad

    dense_w = weight.to_dense().double().requires_grad_()
    x_ref = x.double().requires_grad_()
    (x_ref @ dense_w.t()).backward(grad_y.double())
    expected_values = dense_w.grad[mask].view(rows, -1)
    assert relative_error(grad_x, x_ref.grad) < TOLERANCE[dtype]
    assert relative_error(values.grad, expected_values) < TOLERANCE[dtype]
    assert relative_error(bias_in.grad, grad_y.double().sum(0)) < TOLERANCE[dtype]


@pytest.mark.parametrize("pattern,vector", [("8:32", 32), ("3:8", 1)])
def test_backward_ops_pass_opcheck(pattern, vector):
    from nmspmm.ops.nm import nm_linear_grad_input_op, nm_linear_grad_values_op

    weight = nmspmm.prune(torch.randn(32, 64, device=DEVICE), pattern, vector)
    grad_y = torch.randn(5, 32, device=DEVICE)
    x = torch.randn(5, 64, device=DEVICE)
    offsets = weight.kept_offsets()
    torch.library.opcheck(nm_linear_grad_input_op, (grad_y, weight.values, offsets, weight.n, weight.m, vector, 64))
    torch.library.opcheck(nm_linear_grad_values_op, (x, grad_y, offsets, weight.n, weight.m, vector))


# ---- CSR: csr_linear and csr_linear_feature_major -----------------------------------------------------------


@pytest.mark.usefixtures("seeded")
def test_csr_gradcheck_reference_float64():
    weight = csr_weight(6, 10, density=0.5).cpu()
    values = weight.values.double().requires_grad_()
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    _, _, columns, offsets, order, _, rows, cells, *transposed, _ = csr_op_args(weight, x, bias, "reference")

    def product(x, values, bias):
        return csr_linear_op(x, values, columns, offsets, order, bias, rows, cells, *transposed, "reference")

    assert torch.autograd.gradcheck(product, (x, values, bias))


# CSR's kernels are slow under the interpreter, so the CPU takes a few of its cases and every bitmap case.
_CSR_GRADIENT_CASES = (
    [
        ("reference", torch.float32, False, 9),
        ("reference", torch.float16, True, 9),
        ("triton", torch.float32, False, 9),
        ("triton", torch.bfloat16, True, 9),
        ("triton", torch.float16, False, 1),
    ]
    if DEVICE == "cpu"
    else [("auto", dtype, fm, tokens) for dtype in DTYPES for fm in (False, True) for tokens in (1, 9)]
)
_BITMAP_GRADIENT_CASES = [
    (backend, dtype, fm, tokens)
    for backend in BACKENDS for dtype in DTYPES for fm in (False, True) for tokens in (1, 9)
]


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize(
    "kind,backend,dtype,feature_major,tokens",
    [("csr", *case) for case in _CSR_GRADIENT_CASES] + [("bitmap", *case) for case in _BITMAP_GRADIENT_CASES],
)
def test_unstructured_gradients_match_dense_masked(kind, backend, dtype, feature_major, tokens):
    # CSR and bitmap weights through nmspmm.linear: dX, the values' gradient at the kept positions, and the bias's.
    rows, cols = 21, 70
    weight = csr_weight(rows, cols, dtype) if kind == "csr" else bitmap_weight(rows, cols, dtype, density=0.5)
    mask = weight.mask()
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype)
    bias = torch.randn(rows, device=DEVICE).to(dtype)
    grad_y = torch.randn(tokens, rows, device=DEVICE).to(dtype)

    x_in = (x.t().contiguous() if feature_major else x.clone()).requires_grad_()
    bias_in = bias.clone().requires_grad_()
    sparse = weight._with_values(weight.values.clone().requires_grad_())
    if feature_major:
        nmspmm.linear_feature_major(x_in, sparse, bias_in, backend=backend).backward(grad_y.t())
        grad_x = x_in.grad.t()
    else:
        nmspmm.linear(x_in, sparse, bias_in, backend=backend).backward(grad_y)
        grad_x = x_in.grad

    dense_w = weight.to_dense().double().requires_grad_()
    x_ref = x.double().requires_grad_()
    (x_ref @ dense_w.t()).backward(grad_y.double())
    assert relative_error(grad_x, x_ref.grad) < TOLERANCE[dtype]
    assert relative_error(sparse.values.grad, dense_w.grad[mask]) < TOLERANCE[dtype]
    assert relative_error(bias_in.grad, grad_y.double().sum(0)) < TOLERANCE[dtype]


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("backend", ["reference", "triton"] if DEVICE == "cpu" else ["auto"])
def test_csr_backward_derives_missing_structures(backend):
    # A direct op call without the backward structures: the backward derives them.
    weight = csr_weight(21, 70)
    x = torch.randn(5, 70, device=DEVICE, requires_grad=True)
    values = weight.values.clone().requires_grad_()
    grad_y = torch.randn(5, 21, device=DEVICE)
    args = (x, values, weight.col_indices, weight.row_offsets, weight.row_order(), None) + (None,) * 6
    csr_linear_op(*args, backend).backward(grad_y)
    dense_w = weight.to_dense().double()
    assert relative_error(x.grad, grad_y.double() @ dense_w) < TOLERANCE[torch.float32]
    expected_values = (grad_y.double().t() @ x.detach().double())[weight.mask()]
    assert relative_error(values.grad, expected_values) < TOLERANCE[torch.float32]


@pytest.mark.usefixtures("seeded")
def test_csr_frozen_weight_derives_only_what_it_needs():
    weight = csr_weight(21, 70)
    x = torch.randn(5, 70, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        csr_linear(x, weight)
    assert set(weight._derived) == {"row_order"}  # inference derives no backward structure
    csr_linear(x, weight).sum().backward()
    assert set(weight._derived) == {"row_order", "row_indices", "transposed"}
    assert relative_error(x.grad, weight.to_dense().double().sum(0).expand(5, 70)) < TOLERANCE[torch.float32]


@pytest.mark.usefixtures("seeded")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_csr_gradients_large(dtype):
    weight = prune_csr(torch.randn(1024, 2048, device=DEVICE).to(dtype), 0.9)
    x = torch.randn(300, 2048, device=DEVICE).to(dtype).requires_grad_()
    sparse = weight._with_values(weight.values.clone().requires_grad_())
    grad_y = torch.randn(300, 1024, device=DEVICE).to(dtype)
    csr_linear(x, sparse).backward(grad_y)
    dense_w = weight.to_dense().double()
    assert relative_error(x.grad, grad_y.double() @ dense_w) < TOLERANCE[dtype]
    expected_values = (grad_y.double().t() @ x.detach().double())[weight.mask()]
    assert relative_error(sparse.values.grad, expected_values) < TOLERANCE[dtype]


# ---- block-shuffled: block_shuffled_linear ------------------------------------------------------------------


def kept_tiles(matrix: torch.Tensor, weight: BlockShuffledWeight) -> torch.Tensor:
    """``[nblocks, bn, bk]``: the tiles of ``matrix[row_permutation]`` at the weight's kept blocks, in storage order."""
    (bn, bk), (rows, cols) = weight.block, matrix.shape
    tiles = matrix[weight.row_permutation.long()].reshape(rows // bn, bn, cols // bk, bk).transpose(1, 2)
    return tiles[weight.block_mask()]


def test_block_shuffled_gradcheck_reference_float64():
    sparse, _, _ = block_weight(32, 48, (16, 16), density=0.5)
    x = torch.randn(5, 48, dtype=torch.float64, requires_grad=True)
    values = sparse.values.double().requires_grad_()
    bias = torch.randn(32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, v, b: block_shuffled_linear_op(*block_op_args(sparse, x, v, b, "reference")), (x, values, bias)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_shuffled_gradients_match_dense_masked(dtype, backend):
    rows, cols, tokens, block = 64, 48, 9, (32, 16)
    sparse, _, _ = block_weight(rows, cols, block, dtype, density=0.5, device=DEVICE)
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype).requires_grad_()
    values = sparse.values.clone().requires_grad_()
    bias = torch.randn(rows, device=DEVICE).to(dtype).requires_grad_()
    grad_y = torch.randn(tokens, rows, device=DEVICE).to(dtype)
    trainable = BlockShuffledWeight._trusted(
        values, sparse.block_columns, sparse.block_row_offsets, sparse.row_permutation, sparse.shape, block
    )
    block_shuffled_linear(x, trainable, bias, backend=backend).backward(grad_y)

    dense = sparse.to_dense().double().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    (x_ref @ dense.t()).backward(grad_y.double())
    expected_values = kept_tiles(dense.grad, sparse)
    assert relative_error(x.grad, x_ref.grad) < TOLERANCE[dtype]
    assert relative_error(values.grad, expected_values) < TOLERANCE[dtype]
    assert relative_error(bias.grad, grad_y.double().sum(0)) < TOLERANCE[dtype]
