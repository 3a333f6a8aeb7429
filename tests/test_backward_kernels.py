"""The backward kernels (dX = dY @ W and the SDDMM for dValues) against float64 references built from the
dense weight, outputs poisoned first (interpreter on CPU, native on GPU)."""

from __future__ import annotations

import pytest
import torch

import nmspmm
from nmspmm.kernels import BackwardConfig, nm_grad_input, nm_grad_values
from conftest import DEVICE, TOLERANCE, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (tokens, N, K, pattern, V): odd token counts, n > m - n (dropped offsets stored), every V,
# N not a multiple of the row tile for V = 1.
CASES = [
    (1, 64, 64, "2:4", 16),
    (7, 128, 128, "8:32", 64),
    (33, 96, 96, "3:8", 32),
    (5, 32, 48, "13:16", 16),
    (20, 128, 128, "60:64", 128),
    (1, 8, 16, "2:4", 1),
    (7, 24, 64, "3:4", 1),
    (9, 33, 64, "5:32", 1),
    (3, 5, 64, "60:64", 1),
    (33, 20, 32, "13:16", 1),
]


def _case(tokens: int, rows: int, cols: int, pattern: str, vector: int, dtype: torch.dtype):
    weight = nmspmm.prune(torch.randn(rows, cols, device=DEVICE).to(dtype), pattern, vector)
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype)
    grad_y = torch.randn(tokens, rows, device=DEVICE).to(dtype)
    return weight, x, grad_y


def _poisoned(rows: int, cols: int, dtype: torch.dtype, transposed: bool) -> torch.Tensor:
    """A NaN-filled [rows, cols] output, row-major or (transposed) column-major."""
    if transposed:
        return torch.full((cols, rows), float("nan"), dtype=dtype, device=DEVICE).t()
    return torch.full((rows, cols), float("nan"), dtype=dtype, device=DEVICE)


def _methods(vector: int) -> list[str]:
    return ["dense"] if vector == 1 else ["scatter", "dense"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,rows,cols,pattern,vector", CASES)
def test_grad_input(tokens, rows, cols, pattern, vector, dtype):
    weight, _, grad_y = _case(tokens, rows, cols, pattern, vector, dtype)
    expected = grad_y.double() @ weight.to_dense().double()
    for method in _methods(vector):
        out = _poisoned(tokens, cols, dtype, transposed=method == "scatter")
        result = nm_grad_input(
            grad_y, weight.values, weight.kept_offsets(), weight.n, weight.m, vector, cols, out, method=method
        )
        assert result is out
        assert relative_error(out, expected) < TOLERANCE[dtype], method
    result = nm_grad_input(grad_y, weight.values, weight.kept_offsets(), weight.n, weight.m, vector, cols)
    assert result.shape == (tokens, cols) and result.dtype == dtype
    assert relative_error(result, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,rows,cols,pattern,vector", CASES)
def test_grad_values(tokens, rows, cols, pattern, vector, dtype):
    weight, x, grad_y = _case(tokens, rows, cols, pattern, vector, dtype)
    dense_grad = grad_y.double().t() @ x.double()
    expected = dense_grad[weight.mask()].view(rows, -1)  # kept entries, ascending columns, as in values
    x_t = x.t().contiguous()
    out = _poisoned(rows, weight.kept_per_row, dtype, transposed=tokens % 2 == 1)
    result = nm_grad_values(x_t, grad_y, weight.kept_offsets(), weight.n, weight.m, vector, out)
    assert result is out
    assert relative_error(out, expected) < TOLERANCE[dtype]
    result = nm_grad_values(x_t, grad_y, weight.kept_offsets(), weight.n, weight.m, vector)
    assert result.shape == weight.values.shape and result.dtype == dtype
    assert relative_error(result, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("vector", [1, 32])
def test_strided_operands_and_fp32_out(vector):
    """grad_y stored feature-major, x_t a non-contiguous view, half-precision inputs into fp32 outputs."""
    tokens, rows, cols, dtype = 11, 64, 64, torch.bfloat16
    weight, x, _ = _case(tokens, rows, cols, "8:32", vector, dtype)
    grad_y = torch.randn(rows, tokens, device=DEVICE).to(dtype).t()
    expected = grad_y.double() @ weight.to_dense().double()
    for method in _methods(vector):
        out = _poisoned(tokens, cols, torch.float32, False)
        nm_grad_input(grad_y, weight.values, weight.kept_offsets(), 8, 32, vector, cols, out, method=method)
        assert relative_error(out, expected) < TOLERANCE[dtype], method
    expected = (grad_y.double().t() @ x.double()).gather(1, weight.kept_columns().repeat_interleave(vector, 0))
    out = _poisoned(rows, weight.kept_per_row, torch.float32, True)
    nm_grad_values(x.t(), grad_y, weight.kept_offsets(), 8, 32, vector, out)
    assert relative_error(out, expected) < TOLERANCE[dtype]


def test_custom_config_and_accumulation_is_fresh():
    """A caller's tiles work, and the scatter method zeroes its output before adding."""
    tokens, rows, cols, vector = 17, 64, 64, 32
    weight, x, grad_y = _case(tokens, rows, cols, "2:4", vector, torch.float32)
    expected = grad_y.double() @ weight.to_dense().double()
    out = torch.full((tokens, cols), 5.0, device=DEVICE)
    config = BackwardConfig(32, 16, 32, num_stages=1)
    for _ in range(2):
        nm_grad_input(grad_y, weight.values, weight.kept_offsets(), 2, 4, vector, cols, out, config=config)
        assert relative_error(out, expected) < TOLERANCE[torch.float32]
    expected = (grad_y.double().t() @ x.double()).gather(1, weight.kept_columns().repeat_interleave(vector, 0))
    result = nm_grad_values(x.t().contiguous(), grad_y, weight.kept_offsets(), 2, 4, vector, config=config)
    assert relative_error(result, expected) < TOLERANCE[torch.float32]


def test_argument_errors():
    weight, x, grad_y = _case(4, 32, 32, "2:4", 16, torch.float16)
    args = (weight.values, weight.kept_offsets(), 2, 4, 16)
    with pytest.raises(TypeError, match="grad_y"):
        nm_grad_input(grad_y.float(), *args, 32)
    with pytest.raises(ValueError, match="cols"):
        nm_grad_input(grad_y, *args, 64)
    with pytest.raises(ValueError, match="method"):
        nm_grad_input(grad_y, weight.values, weight.kept_offsets().repeat_interleave(16, 0), 2, 4, 1, 32,
                      method="scatter")
    with pytest.raises(ValueError, match="block_n"):
        nm_grad_input(grad_y, *args, 32, config=BackwardConfig(16, 32, 16))
    with pytest.raises(TypeError, match="x_t"):
        nm_grad_values(x.t().float(), grad_y, weight.kept_offsets(), 2, 4, 16)
    with pytest.raises(ValueError, match="kept_offsets"):
        nm_grad_values(x.t(), grad_y, weight.kept_offsets(), 2, 4, 32)
