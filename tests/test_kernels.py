"""The Triton kernels against a float64 reference, outputs poisoned first (interpreter on CPU, native on GPU)."""

from __future__ import annotations

import pytest
import torch

import nmspmm
from nmspmm.kernels import VectorConfig, nm_element_matmul, nm_vector_matmul, transpose
from nmspmm.kernels import choose_vector_config
from conftest import DEVICE, TOLERANCE, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(tokens: int, rows: int, cols: int, pattern: str, vector: int, dtype: torch.dtype):
    weight = nmspmm.prune(torch.randn(rows, cols, device=DEVICE).to(dtype), pattern, vector)
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype)
    bias = torch.randn(rows, device=DEVICE).to(dtype)
    expected = x.double() @ weight.to_dense().double().t() + bias.double()
    return weight, x, bias, expected


def _poisoned(tokens: int, rows: int, dtype: torch.dtype, feature_major: bool) -> torch.Tensor:
    if feature_major:
        return torch.full((rows, tokens), float("nan"), dtype=dtype, device=DEVICE).t()
    return torch.full((tokens, rows), float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,rows,cols,pattern,vector",
    [
        (1, 64, 64, "2:4", 16),
        (8, 64, 96, "4:8", 32),
        (7, 128, 128, "8:32", 64),
        (33, 96, 96, "3:8", 32),
        (20, 128, 128, "4:64", 128),
        (5, 32, 48, "13:16", 16),
    ],
)
@pytest.mark.parametrize("feature_major", [False, True])
@pytest.mark.parametrize("variant", ["chosen", "weight_first", "split_k"])
def test_vector_kernel(tokens, rows, cols, pattern, vector, dtype, feature_major, variant):
    weight, x, bias, expected = _case(tokens, rows, cols, pattern, vector, dtype)
    out = _poisoned(tokens, rows, dtype, feature_major)
    config = choose_vector_config(tokens, rows, weight.kept_per_row, vector, dtype, x.device)
    if variant == "weight_first":
        config = VectorConfig(32, min(vector, 32), 16, 4, 2, weight_first=True)
    elif variant == "split_k":
        config = VectorConfig(16, 16, 16, 4, 2, split_k=3, weight_first=tokens % 2 == 0)
    nm_vector_matmul(
        x.t().contiguous(), weight.values, weight.kept_offsets(), weight.n, weight.m, vector, out, config, bias
    )
    assert relative_error(out, expected) < TOLERANCE[dtype]


def test_vector_kernel_tf32():
    weight, x, _, expected = _case(19, 64, 128, "8:32", 32, torch.float32)
    expected = x.double() @ weight.to_dense().double().t()
    out = _poisoned(19, 64, torch.float32, False)
    config = choose_vector_config(19, 64, weight.kept_per_row, 32, torch.float32, x.device)
    nm_vector_matmul(
        x.t().contiguous(), weight.values, weight.kept_offsets(), weight.n, weight.m, 32, out, config,
        input_precision="tf32",
    )
    assert relative_error(out, expected) < TOLERANCE["tf32"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,rows,cols,pattern",
    [(1, 8, 16, "2:4"), (7, 24, 64, "3:4"), (9, 33, 64, "5:32"), (3, 5, 64, "60:64")],
)
@pytest.mark.parametrize("feature_major", [False, True])
def test_element_kernel(tokens, rows, cols, pattern, dtype, feature_major):
    weight, x, bias, expected = _case(tokens, rows, cols, pattern, 1, dtype)
    out = _poisoned(tokens, rows, dtype, feature_major)
    nm_element_matmul(x.t().contiguous(), weight.values, weight.kept_offsets(), weight.n, weight.m, out, bias)
    assert relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5), (37, 70), (64, 16)])
def test_transpose(shape, dtype):
    base = torch.randn(shape[0], shape[1] * 2, device=DEVICE).to(dtype)
    x = base[:, ::2]
    out = torch.full((shape[1], shape[0]), float("nan"), dtype=dtype, device=DEVICE)
    transpose(x, out)
    assert torch.equal(out, x.t())


def test_l2_probe_sums_the_chunks_it_reads():
    from nmspmm.kernels import L2_PROBE_BLOCK, l2_read

    chunks, programs, reads = 3, 2, 4
    buffer = torch.randn(chunks * L2_PROBE_BLOCK + 5, device=DEVICE).bfloat16()
    out = torch.full((programs * L2_PROBE_BLOCK,), float("nan"), device=DEVICE)
    assert l2_read(buffer, programs, reads, out) == programs * reads * L2_PROBE_BLOCK * 2
    rows = buffer[: chunks * L2_PROBE_BLOCK].float().view(chunks, L2_PROBE_BLOCK)
    for program in range(programs):
        expected = sum(rows[(program * 7 + step * 13) % chunks] for step in range(reads))
        assert torch.allclose(out.view(programs, -1)[program], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="buffer, out: need at least 4096 buffer elements"):
        l2_read(buffer[:100], programs, reads, out)


def test_touch_probe_stores_each_program_index():
    from nmspmm.kernels import touch

    out = torch.full((5,), -1, dtype=torch.int32, device=DEVICE)
    touch(out, 4)
    assert out.tolist() == [0, 1, 2, 3, -1]
    with pytest.raises(ValueError, match="out: need an int32 tensor of at least 4 elements, got torch.float32 of 5"):
        touch(out.float(), 4)
