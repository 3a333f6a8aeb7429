"""The lean launch path (kernels.launch): compiled kernels launched through their handle must compute what
Triton's generic launcher computes, for every specialization (alignment, unit and multiple-of-16 ints), on
the current stream, and inside CUDA-graph capture; split-K reduced inside the launch is deterministic."""

from __future__ import annotations

import sys

import pytest
import torch

import nmspmm
from conftest import DEVICE, TOLERANCE, relative_error
from nmspmm.kernels import launch as launch_module
from nmspmm.kernels.split_k import split_k_buffers


def _dense(x: torch.Tensor, weight: nmspmm.NMSparseWeight) -> torch.Tensor:
    return (x.double() @ weight.to_dense().double().t()).to(x.dtype)


def test_hooked_reads_functions_and_hook_chains():
    class Chain:
        def __init__(self, calls):
            self.calls = calls

    assert not launch_module._hooked(None)
    assert not launch_module._hooked(Chain([]))
    assert launch_module._hooked(Chain([print]))
    assert launch_module._hooked(print)


def test_specialization_separates_alignment_and_values():
    base = torch.randn(64)
    key = launch_module._specialization
    assert key([base, 16, 1]) != key([base[1:], 16, 1])  # a 4-byte offset breaks 16-byte alignment
    assert key([base, 16]) != key([base, 17])
    assert key([base, None]) == key([base.clone(), None])


def test_split_k_buffers_grow_and_keep_zeroed_counters():
    workspace, counters = split_k_buffers(torch.device(DEVICE), 2, 3, 5, 7)
    assert workspace.shape == (2, 3, 5) and workspace.dtype == torch.float32
    assert counters.numel() >= 7 and int(counters.abs().sum()) == 0
    bigger, counters_after = split_k_buffers(torch.device(DEVICE), 4, 30, 50, 9000)
    assert bigger.shape == (4, 30, 50) and counters_after.numel() >= 9000 and int(counters_after.abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 3, 8, 16, 48, 333])
@pytest.mark.parametrize("pattern,vector", [("8:32", 64), ("2:4", 16), ("2:4", 1)])
def test_lean_launch_matches_reference_on_fresh_inputs(monkeypatch, tokens, pattern, vector):
    weight = nmspmm.prune(torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16), pattern, vector)
    generic = []
    real_generic = launch_module._generic
    monkeypatch.setattr(launch_module, "_generic", lambda *args: generic.append(args[0]) or real_generic(*args))
    for offset in (0, 1):  # offset 1: x's data is not 16-byte aligned, a separate specialization
        for call in range(3):  # the first call compiles through Triton's launcher, the next ones use the handle
            storage = torch.randn(tokens * 1024 + offset, device="cuda", dtype=torch.bfloat16)
            x = storage[offset:].view(tokens, 1024)
            generic.clear()
            y = nmspmm.linear(x, weight)
            assert relative_error(y, _dense(x, weight)) < TOLERANCE[torch.bfloat16]
            if offset == 0 and call > 0:
                assert not generic, "an aligned repeat must launch the kept handle, not Triton's launcher"


@pytest.mark.gpu
def test_split_k_under_compiled_cuda_graphs():
    # torch.compile's CUDA graphs route the warm-up's allocations into their pool and refuse live ones that no
    # output holds: the shared split-K buffers must come from elsewhere.
    torch._dynamo.reset()
    weight = nmspmm.prune(torch.randn(1024, 11008, device="cuda", dtype=torch.bfloat16), "2:4", 64)
    layer = nmspmm.SparseLinear(weight).eval()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(1, 11008, device="cuda", dtype=torch.bfloat16)
            torch.compiler.cudagraph_mark_step_begin()
            y = compiled(x).clone()
            assert relative_error(y, _dense(x, weight)) < TOLERANCE[torch.bfloat16]
    torch._dynamo.reset()


@pytest.fixture
def launched(monkeypatch) -> list:
    """The kernels launched while a test runs, through :func:`launch` or a prepared ``Launcher``."""
    kernels: list = []
    real_launch, real_prepared = launch_module.launch, launch_module.Launcher.__call__

    def counting(kernel, *args, **kwargs):
        kernels.append(kernel)
        return real_launch(kernel, *args, **kwargs)

    def counting_prepared(self, *leading):
        kernels.append(self.kernel)
        return real_prepared(self, *leading)

    for module in ("nm_vector", "nm_element", "transpose", "block_sparse", "csr_spmm"):
        if hasattr(sys.modules[f"nmspmm.kernels.{module}"], "launch"):
            monkeypatch.setattr(sys.modules[f"nmspmm.kernels.{module}"], "launch", counting)
    monkeypatch.setattr(launch_module.Launcher, "__call__", counting_prepared)
    return kernels


@pytest.mark.parametrize(
    "tokens,pattern,vector,expected",
    [
        (1, "8:32", 16, 1),  # one token is already feature-major
        (16, "8:32", 16, 1),  # up to ROW_MAJOR_TOKENS: row-major x, no transpose
        (17, "8:32", 16, 2),  # transpose + product
        (33, "6:8", 16, 2),
        (1, "2:4", 1, 1),
        (3, "2:4", 1, 1),  # the element-wise kernel reads row-major x at any token count
        (333, "2:4", 1, 1),
    ],
)
def test_launches_per_product(launched, tokens, pattern, vector, expected):
    # Split-K is reduced inside the product's launch, so a call costs one launch, or two with a transpose.
    from nmspmm.ops.nm import ROW_MAJOR_TOKENS

    assert ROW_MAJOR_TOKENS == 16
    weight = nmspmm.prune(torch.randn(64, 512, device=DEVICE), pattern, vector)
    x = torch.randn(tokens, 512, device=DEVICE)
    y = nmspmm.linear(x, weight, backend="triton")
    assert relative_error(y, _dense(x, weight)) < TOLERANCE[torch.float32]
    assert len(launched) == expected


@pytest.mark.parametrize("tokens,expected", [(1, 1), (5, 2), ("transposed write", 3)])
def test_csr_launches_per_product(launched, tokens, expected):
    # One token: the SpMM alone; more: x's transpose first; from _transposed_write_min_tokens (32 under the
    # interpreter, 512 on a GPU, where it measured faster) the output is also written feature-major and transposed.
    from nmspmm.kernels.csr_spmm import _transposed_write_min_tokens

    if tokens == "transposed write":
        tokens = _transposed_write_min_tokens()
    weight = nmspmm.prune.prune_csr(torch.randn(48, 80, device=DEVICE), sparsity=0.7)
    x = torch.randn(tokens, 80, device=DEVICE)
    y = nmspmm.linear(x, weight, backend="triton")
    assert relative_error(y, x.double() @ weight.to_dense().double().t()) < TOLERANCE[torch.float32]
    assert len(launched) == expected


def test_block_product_is_one_launch_with_split_k(launched):
    weight = nmspmm.prune.prune_block_shuffled(torch.randn(64, 512, device=DEVICE), 0.5, (16, 16), search=False)
    from nmspmm.kernels.block_sparse import BlockSparseConfig, block_sparse_matmul

    x = torch.randn(3, 512, device=DEVICE)
    out = torch.full((3, 64), float("nan"), device=DEVICE)
    config = BlockSparseConfig(block_m=16, num_warps=4, num_stages=1, split_k=2)
    block_sparse_matmul(
        x, weight.values, weight.block_columns, weight.block_row_offsets, weight.block_row_order,
        weight.row_permutation, out, config=config,
    )
    expected = x.double() @ weight.to_dense().double().t()
    assert relative_error(out, expected) < TOLERANCE[torch.float32]
    assert len(launched) == 1


_FORMATS = {
    "nm": lambda dense: nmspmm.prune(dense, "8:32", 16),
    "csr": lambda dense: nmspmm.prune.prune_csr(dense, sparsity=0.7),
    "block": lambda dense: nmspmm.prune.prune_block_shuffled(dense, 0.5, (16, 16), search=False),
}


@pytest.mark.parametrize("format_name", list(_FORMATS))
def test_eager_products_keep_one_plan_per_layout(format_name):
    # An eager call keeps its prepared launches on the weight: a repeat of the layout builds nothing, and a call
    # with gradient runs the kept plan inside the op's autograd formula.
    weight = _FORMATS[format_name](torch.randn(64, 512, device=DEVICE))
    bias = torch.randn(64, device=DEVICE)

    def dense_product(x: torch.Tensor) -> torch.Tensor:
        return x.double() @ weight.to_dense().double().t()

    with torch.no_grad():
        for tokens in (1, 1, 7, 7, 1):
            x = torch.randn(2, tokens, 512, device=DEVICE)
            y = nmspmm.linear(x, weight, bias, backend="triton")
            assert relative_error(y, dense_product(x) + bias.double()) < TOLERANCE[torch.float32]
        assert len(weight.launch_plans) == 2
        plans = 2
        if format_name != "block":  # block-sparse products read x row-major only
            y_t = nmspmm.linear_feature_major(x[0].t().contiguous(), weight, backend="triton")
            assert relative_error(y_t.t(), dense_product(x[0])) < TOLERANCE[torch.float32]
            plans = 3
            assert len(weight.launch_plans) == plans
        nmspmm.linear(x, weight, backend="triton")  # another bias: a plan of its own, in place of the first
        assert len(weight.launch_plans) == plans
    values = weight.values.requires_grad_()
    x = torch.randn(2, 3, 512, device=DEVICE, requires_grad=True)
    y = nmspmm.linear(x, weight, backend="triton")
    assert len(weight.launch_plans) == plans + 1  # x's own layout: the autograd formulas take x as given
    y.square().sum().backward()
    # The reference: the same loss over the densified weight (differentiable in the values) in float64.
    x_ref = x.detach().double().requires_grad_()
    loss = (x_ref @ weight.to_dense().double().t()).square().sum()
    grad_x, grad_values = torch.autograd.grad(loss, (x_ref, values))
    assert relative_error(x.grad, grad_x) < TOLERANCE[torch.float32]
    assert relative_error(values.grad, grad_values) < TOLERANCE[torch.float32]
    values.requires_grad_(False)


def test_kept_plan_takes_misaligned_and_bad_inputs():
    # The same shape and strides at an address off 16 bytes: the kept plan must not launch the handle compiled
    # for aligned data (it falls back to Triton's launcher); a bad x still gets its error.
    weight = nmspmm.prune(torch.randn(64, 512, device=DEVICE), "8:32", 16)
    storage = torch.randn(3 * 512 + 1, device=DEVICE)
    with torch.no_grad():
        for x in (storage[:-1].view(3, 512), storage[1:].view(3, 512), storage[:-1].view(3, 512)):
            assert relative_error(nmspmm.linear(x, weight, backend="triton"), _dense(x, weight)) < 1e-5
        with pytest.raises(TypeError, match="x: dtype"):
            nmspmm.linear(storage[:-1].view(3, 512).double(), weight, backend="triton")
        with pytest.raises(ValueError, match="x: expected last dimension K=512"):
            nmspmm.linear(storage[:-1].view(3, 512)[:, :500], weight, backend="triton")


def test_feature_major_plan_refuses_what_the_full_path_refuses():
    weight = nmspmm.prune(torch.randn(64, 512, device=DEVICE), "8:32", 16)
    with torch.no_grad(), pytest.raises(ValueError, match="x_t: expected a 2-D"):
        nmspmm.linear_feature_major(torch.randn(512, 2, 3, device=DEVICE), weight, backend="triton")


@pytest.mark.gpu
def test_kept_plan_follows_the_current_stream():
    # One token over long rows splits K: the kept plan's split-K workspace belongs to a stream, so a call on
    # another stream (and back) must take that stream's buffers and stay right on each.
    weight = nmspmm.prune(torch.randn(1024, 11008, device="cuda", dtype=torch.bfloat16), "2:4", 64)
    side = torch.cuda.Stream()
    with torch.no_grad():
        for stream in (torch.cuda.current_stream(), side, torch.cuda.current_stream(), side):
            with torch.cuda.stream(stream):
                x = torch.randn(1, 11008, device="cuda", dtype=torch.bfloat16)
                y = nmspmm.linear(x, weight)
            stream.synchronize()
            assert relative_error(y, _dense(x, weight)) < TOLERANCE[torch.bfloat16]
    assert len(weight.launch_plans) == 1
