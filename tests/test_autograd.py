"""Gradients through nmspmm.linear: for x (dY @ W) and for the kept weights only (SDDMM), against dense
masked gradients; gradcheck in float64 on the reference path."""

from __future__ import annotations

import pytest
import torch

import nmspmm
from nmspmm.ops import nm_linear_op
from conftest import DEVICE, TOLERANCE, relative_error

BACKENDS = ["reference", "triton"] if DEVICE == "cpu" else ["auto"]


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
        lambda x, v, b: call_op(eager, (x, v, offsets, b, weight.n, weight.m, weight.vector, "reference")),
        (x, values, bias),
    )
    assert seen and set(seen) == {9}  # the op's 8 arguments and what runs the forward


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
