"""The unstructured bitmap products (bitmap_linear and its feature-major form) against float64 dense references:
forward on odd shapes, gradients for x, the kept values and the bias, the derived backward structures, kept
plans, torch.compile and opcheck; kernels under the interpreter on the CPU (``backend="triton"``), natively on a
GPU."""

from __future__ import annotations

import pytest
import torch

from nmspmm.formats.bitmap import BitmapWeight
from nmspmm.ops.bitmap import (
    bitmap_linear, bitmap_linear_feature_major, bitmap_linear_feature_major_op, bitmap_linear_grad_input_op,
    bitmap_linear_op,
)
from conftest import DEVICE, TOLERANCE, bitmap_weight, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["reference", "triton"] if DEVICE == "cpu" else ["auto"]


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 70), (1, 70), (7, 70), (2, 3, 70), (33, 70), (3, 37, 70)])
@pytest.mark.parametrize("density", [0.1, 0.7])
def test_bitmap_linear_matches_float64(backend, dtype, shape, density):
    weight = bitmap_weight(21, 70, dtype, density)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    bias = torch.randn(21, device=DEVICE).to(dtype)
    expected = x.double() @ weight.to_dense().double().t() + bias.double()
    y = bitmap_linear(x, weight, bias, backend=backend)
    assert y.shape == (*shape[:-1], 21) and y.dtype == dtype and y.is_contiguous()
    if x.numel():
        assert relative_error(y, expected) < TOLERANCE[dtype]
    y_t = bitmap_linear_feature_major(x.reshape(-1, 70).t().contiguous(), weight, None, backend=backend)
    assert y_t.shape == (21, x.numel() // 70)
    if x.numel():
        assert relative_error(y_t.t(), expected.reshape(-1, 21) - bias.double()) < TOLERANCE[dtype]


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("backend", BACKENDS)
def test_bitmap_backward_derives_missing_structures(backend):
    # The op called without the backward's structures (as a user of the raw op would) derives them itself.
    weight = bitmap_weight(21, 70)
    values = weight.values.clone().requires_grad_()
    x = torch.randn(5, 70, device=DEVICE, requires_grad=True)
    grad_y = torch.randn(5, 21, device=DEVICE)
    args = (x, values, weight.bitmap, weight.block_offsets, None, backend, None, None, None, None, None)
    bitmap_linear_op(*args).backward(grad_y)
    dense_w = weight.to_dense().double().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    (x_ref @ dense_w.t()).backward(grad_y.double())
    assert relative_error(x.grad, x_ref.grad) < TOLERANCE[torch.float32]
    assert relative_error(values.grad, dense_w.grad[weight.mask()]) < TOLERANCE[torch.float32]


def test_bitmap_transposed_structure_is_the_transposed_weight():
    weight = bitmap_weight(37, 70, density=0.3)
    transposed_bitmap, transposed_offsets, permutation = weight.transposed_structure()
    transposed = BitmapWeight(weight.values[permutation], transposed_bitmap, transposed_offsets, (70, 37))
    assert torch.equal(transposed.to_dense(), weight.to_dense().t())
    rows, cols = weight.coordinates()
    assert torch.equal(weight.to_dense()[rows.long(), cols.long()], weight.values)


@pytest.mark.usefixtures("seeded")
def test_bitmap_inference_derives_no_backward_structures():
    weight = bitmap_weight(21, 70)
    with torch.no_grad():
        bitmap_linear(torch.randn(4, 70, device=DEVICE), weight)
    assert not weight._derived


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("backend", BACKENDS)
def test_bitmap_linear_keeps_its_plan(backend):
    if backend == "reference":
        pytest.skip("the reference path keeps no launch plan")
    weight = bitmap_weight(21, 70)
    x = torch.randn(6, 70, device=DEVICE)
    first = bitmap_linear(x, weight, backend=backend)
    assert len(weight.launch_plans) == 1
    again = bitmap_linear(torch.randn(6, 70, device=DEVICE), weight, backend=backend)
    assert len(weight.launch_plans) == 1 and again.shape == first.shape


def test_bitmap_linear_refuses_bad_operands():
    weight = bitmap_weight(21, 70)
    with pytest.raises(ValueError, match=r"x: expected last dimension K=70 \(in_features\), got shape \(3, 71\)"):
        bitmap_linear(torch.randn(3, 71, device=DEVICE), weight)
    with pytest.raises(TypeError, match="x: dtype torch.float16 does not match weight dtype torch.float32"):
        bitmap_linear(torch.randn(3, 70, device=DEVICE).half(), weight)
    with pytest.raises(TypeError, match="weight: expected an nmspmm.BitmapWeight, got Tensor"):
        bitmap_linear(torch.randn(3, 70, device=DEVICE), torch.randn(21, 70, device=DEVICE))
    with pytest.raises(ValueError, match=r"bias: expected shape \(21,\), got \(20,\)"):
        bitmap_linear(torch.randn(3, 70, device=DEVICE), weight, torch.randn(20, device=DEVICE))
    with pytest.raises(ValueError, match="backend: expected one of"):
        bitmap_linear(torch.randn(3, 70, device=DEVICE), weight, backend="cusparse")


@pytest.mark.usefixtures("seeded")
def test_bitmap_compile_training_step():
    weight = bitmap_weight(21, 70)
    values = weight.values.clone().requires_grad_()
    x = torch.randn(6, 70, device=DEVICE, requires_grad=True)

    def loss(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return bitmap_linear(x, weight._with_values(values)).square().sum()

    torch.compile(loss, fullgraph=True, backend="aot_eager")(x, values).backward()
    compiled_grads = (x.grad, values.grad)
    x.grad = values.grad = None
    loss(x, values).backward()
    assert relative_error(compiled_grads[0], x.grad) < TOLERANCE[torch.float32]
    assert relative_error(compiled_grads[1], values.grad) < TOLERANCE[torch.float32]


def _op_samples() -> list[object]:
    samples = []
    for backend in BACKENDS:
        weight = bitmap_weight(8, 40)
        x = torch.randn(3, 40, device=DEVICE)
        bias = torch.randn(8, device=DEVICE)
        structures = (*weight.coordinates(), *weight.transposed_structure())
        args = (x, weight.values, weight.bitmap, weight.block_offsets, bias, backend, *structures)
        samples.append(pytest.param(bitmap_linear_op, args, id=f"bitmap_linear-{backend}"))
        feature_major = (x.t().contiguous(), *args[1:])
        samples.append(pytest.param(bitmap_linear_feature_major_op, feature_major, id=f"feature_major-{backend}"))
    transposed_bitmap, transposed_offsets, permutation = weight.transposed_structure()
    grad_input_args = (torch.randn(3, 8, device=DEVICE), weight.values, permutation, transposed_bitmap,
                       transposed_offsets)  # fmt: skip
    samples.append(pytest.param(bitmap_linear_grad_input_op, grad_input_args, id="bitmap_linear_grad_input"))
    return samples


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("op,args", _op_samples())
def test_bitmap_opcheck(op, args):
    torch.library.opcheck(op, args)
