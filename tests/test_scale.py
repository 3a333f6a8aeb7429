"""Products past int32 offsets (issue 15, point 3): the forward N:M kernels and the transpose switch to int64
arithmetic (``WIDE``) where an operand spans 2**31 elements, the kernels without that switch refuse such operands
with a clear error, and on a GPU a long-context prefill of that size is right."""

from __future__ import annotations

import pytest
import torch

import nmspmm
from conftest import DEVICE, TOLERANCE, relative_error
from nmspmm.kernels import launch as launch_module
from nmspmm.ops.backend import check_gradient_extent, check_int32_offsets


def _dense(x: torch.Tensor, weight: nmspmm.NMSparseWeight) -> torch.Tensor:
    return x.double() @ weight.to_dense().double().t()


def test_wide_offsets_counts_the_largest_offset():
    limit = launch_module.INT32_OFFSETS
    assert not launch_module.wide_offsets(((2**15, 2**16), (2**16, 1)))  # 2**31 elements: offsets up to 2**31 - 1
    assert launch_module.wide_offsets(((2**15 + 1, 2**16), (2**16, 1)))
    assert launch_module.wide_offsets(((2, 3), (limit, 1)))  # a large stride alone
    assert not launch_module.wide_offsets(((0, 2**40), (2**40, 1)))  # empty: nothing is read
    assert launch_module.wide_offsets(extents=(limit,)) and not launch_module.wide_offsets(extents=(limit - 1,))


@pytest.mark.parametrize("tokens", [1, 3, 7, 40])
@pytest.mark.parametrize("pattern,vector", [("8:32", 16), ("2:4", 1), ("6:8", 32)])
def test_wide_index_path_matches_the_reference(monkeypatch, tokens, pattern, vector):
    # With the threshold lowered, every product and transpose takes its int64 path, which must compute the same.
    monkeypatch.setattr(launch_module, "INT32_OFFSETS", 64)
    weight = nmspmm.prune(torch.randn(64, 256, device=DEVICE), pattern, vector)
    bias = torch.randn(64, device=DEVICE)
    x = torch.randn(tokens, 256, device=DEVICE)
    with torch.no_grad():
        y = nmspmm.linear(x, weight, bias, backend="triton")
        y_t = nmspmm.linear_feature_major(x.t().contiguous(), weight, bias, backend="triton")
    expected = _dense(x, weight) + bias.double()
    assert relative_error(y, expected) < TOLERANCE[torch.float32]
    assert relative_error(y_t.t(), expected) < TOLERANCE[torch.float32]


def test_int32_kernels_refuse_what_they_cannot_index():
    huge = torch.empty(2**16, 2**15 + 1, device="meta")
    with pytest.raises(ValueError, match=r"x: shape \(65536, 32769\) spans 2\*\*31 elements"):
        check_int32_offsets("x", huge, "the SDDMM kernels")
    check_int32_offsets("x", torch.empty(2**16, 2**15, device="meta"), "the SDDMM kernels")
    with pytest.raises(ValueError, match="x: 65536 tokens by 32769 output features"):
        check_gradient_extent(torch.empty(2**16, 8, device="meta"), 2**15 + 1, "the N:M backward kernels")


@pytest.mark.parametrize("make", [
    lambda dense: nmspmm.prune(dense, "8:32", 16),
    lambda dense: nmspmm.prune.prune_csr(dense, sparsity=0.7),
])
def test_training_past_int32_offsets_is_refused_at_the_forward(monkeypatch, make):
    # The backward kernels index in int32: a product that needs them refuses such sizes before computing.
    monkeypatch.setattr(launch_module, "INT32_OFFSETS", 1024)
    weight = make(torch.randn(64, 256, device=DEVICE))
    weight.values.requires_grad_()
    with pytest.raises(ValueError, match="^x: .*int32 offsets of the"):
        nmspmm.linear(torch.randn(8, 256, device=DEVICE), weight, backend="triton")
    with torch.no_grad():  # without gradient only the forward kernels run
        nmspmm.linear(torch.randn(8, 256, device=DEVICE), weight, backend="triton")


@pytest.mark.gpu
def test_long_context_prefill_past_int32_offsets():
    # x of 131136 x 16384 bf16 (2**31 + 2**20 elements) and an output of as many: the sizes of a long-context
    # prefill. The rows near the end are where int32 offsets would wrap.
    if torch.cuda.mem_get_info()[0] < 24 * 2**30:
        pytest.skip("needs 24 GB of free GPU memory")
    torch.manual_seed(0)
    tokens, features = 2**17 + 64, 2**14
    weight = nmspmm.prune(torch.randn(features, features, device="cuda", dtype=torch.bfloat16), "8:32", 64)
    x = torch.randn(tokens, features, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = nmspmm.linear(x, weight)
    dense = weight.to_dense().float()
    for rows in (slice(0, 64), slice(tokens - 64, tokens), slice(tokens // 2 - 32, tokens // 2 + 32)):
        expected = x[rows].float() @ dense.t()
        assert relative_error(y[rows], expected) < TOLERANCE[torch.bfloat16]
    del y
    with torch.no_grad():
        y_t = nmspmm.linear_feature_major(x.t().contiguous(), weight)
    expected = x[-64:].float() @ dense.t()
    assert relative_error(y_t[:, -64:].t(), expected) < TOLERANCE[torch.bfloat16]
