"""The custom ops of every format (N:M, CSR and its SDDMM, block-shuffled) under torch.compile (no graph breaks),
torch.library.opcheck, and CUDA-graph capture (N:M and bitmap layers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmspmm
from conftest import (
    DEVICE, TOLERANCE, bitmap_weight, block_op_args, block_weight, csr_op_args, csr_weight, relative_error,
)
from nmspmm.kernels.sddmm import CELL
from nmspmm.ops import nm_linear_feature_major_op, nm_linear_op
from nmspmm.ops.block_shuffled import block_shuffled_linear, block_shuffled_linear_op
from nmspmm.ops.csr import (
    csr_linear,
    csr_linear_feature_major,
    csr_linear_feature_major_op,
    csr_linear_grad_input_op,
    csr_linear_op,
    csr_sddmm_op,
)

# The block-shuffled tests: the reference path by name in place of "auto" on the CPU.
BACKENDS = ["reference", "triton"] if DEVICE == "cpu" else ["auto"]


def _model(dtype: torch.dtype = torch.float32, activation: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)]
    model = nn.Sequential(*(layers if activation else layers[::2])).to(device=DEVICE, dtype=dtype)
    report = nmspmm.sparsify(model, "8:32", vector=16)
    assert len(report.swapped) == 2
    return model.eval()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_matches_eager(backend):
    model = _model()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        for shape in [(5, 64), (2, 7, 64)]:  # the second shape recompiles with symbolic sizes
            x = torch.randn(shape, device=DEVICE)
            assert relative_error(compiled(x), model(x)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("weight_dtype", [None, torch.int8])
def test_compiled_forward_does_not_guard_the_derived_kept_offsets(weight_dtype):
    """The compiled forward derives the kept offsets in the graph, so the module's derived buffer is not guarded
    (each guard is checked on every call of a compiled model: host time)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 32)).to(DEVICE)
    nmspmm.sparsify(model, "8:32", vector=16, weight_dtype=weight_dtype)
    x = torch.randn(3, 64, device=DEVICE)

    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    with torch.no_grad():
        expected = model(x)
        assert relative_error(torch.compile(run, fullgraph=True, backend="eager")(x), expected) < 1e-5
    entries = _debug_get_cache_entry_list(run.__code__)
    assert len(entries) == 1
    guards = str(entries[0].guard_manager)
    assert "_buffers['offsets']" in guards and "_buffers['kept_offsets']" not in guards


@pytest.mark.parametrize("weight_dtype", [None, torch.int8])
def test_compiled_element_wise_product_takes_the_module_bitmap(monkeypatch, weight_dtype):
    """A compiled V = 1 module passes its bitmap buffer to the kernel: nothing derives it again per call (the
    kept offsets a traced graph derives are new tensors each call, which no cache recognises)."""
    from nmspmm.kernels import nm_element

    model = nn.Sequential(nn.Linear(64, 32)).to(DEVICE)
    nmspmm.sparsify(model, "2:4", vector=1, weight_dtype=weight_dtype)
    model[0].backend = "triton"
    assert model[0].kept_bits is not None and model[0].kept_bits.dtype == torch.int32
    derived = []
    original = nm_element.kept_bits
    monkeypatch.setattr(nm_element, "kept_bits", lambda *args: derived.append(1) or original(*args))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for tokens in (3, 3, 5):
            x = torch.randn(tokens, 64, device=DEVICE)
            assert relative_error(compiled(x), model(x)) < 1e-5
    assert derived == []


def test_compile_inductor_matches_eager():
    # Only sparse layers: inductor then has no elementwise kernel to generate, and skips its slow C++ compile.
    model = _model(activation=False)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 5, 64, device=DEVICE)
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < TOLERANCE[torch.float32]


def test_compile_functional_feature_major():
    weight = nmspmm.prune(torch.randn(32, 64, device=DEVICE), "6:8", 16)
    bias = torch.randn(32, device=DEVICE)

    def chain(x_t: torch.Tensor) -> torch.Tensor:
        return torch.relu(nmspmm.linear_feature_major(x_t, weight, bias))

    x_t = torch.randn(64, 9, device=DEVICE)
    compiled = torch.compile(chain, fullgraph=True, backend="aot_eager")
    assert relative_error(compiled(x_t), chain(x_t)) < TOLERANCE[torch.float32]


def test_compile_training_step():
    model = _model().train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 64, device=DEVICE)
    compiled(x).square().mean().backward()
    assert all(parameter.grad is not None for parameter in model.parameters())


def _op_samples() -> list[object]:
    """pytest params of (op, args): element- and vector-wise, kept and dropped offsets, bias or not, one token
    or several, each backend."""
    samples = []
    backends = ["auto", "triton"] if DEVICE == "cpu" else ["auto"]
    for pattern, vector, tokens, with_bias in [("2:4", 16, 5, True), ("6:8", 16, 1, False), ("3:8", 1, 3, True)]:
        weight = nmspmm.prune(torch.randn(32, 64, device=DEVICE), pattern, vector)
        bias = torch.randn(32, device=DEVICE) if with_bias else None
        x = torch.randn(tokens, 64, device=DEVICE)
        for backend in backends:
            rest = (weight.values, weight.kept_offsets(), bias, weight.n, weight.m, weight.vector, backend)
            name = f"{pattern}-V{vector}-M{tokens}-{'bias' if with_bias else 'nobias'}-{backend}"
            samples.append(pytest.param(nm_linear_op, (x, *rest), id=f"nm_linear-{name}"))
            x_t = x.t().contiguous()
            samples.append(pytest.param(nm_linear_feature_major_op, (x_t, *rest), id=f"feature_major-{name}"))
    return samples


@pytest.mark.parametrize("op,args", _op_samples())
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_op_schema():
    schema = str(torch.ops.nmspmm.nm_linear.default._schema)
    assert schema == (
        "nmspmm::nm_linear(Tensor x, Tensor values, Tensor kept_offsets, Tensor? bias, "
        "int n, int m, int vector, str backend, Tensor? kept_bits=None) -> Tensor"
    )


def _capture_and_replay(model: nn.Module, x_static: torch.Tensor) -> None:
    """``model(x_static)`` captured in a CUDA graph after a warm-up, then replayed on fresh inputs copied into
    ``x_static``, each result against an eager call."""
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles and caches off the capture
            for _ in range(2):
                model(x_static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = model(x_static)
        for _ in range(2):
            x_new = torch.randn_like(x_static)
            x_static.copy_(x_new)
            graph.replay()
            torch.cuda.synchronize()
            assert relative_error(y_static, model(x_new)) < TOLERANCE[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 48, 300])
def test_cuda_graph_capture_and_replay(tokens):
    _capture_and_replay(_model(torch.float16), torch.randn(tokens, 64, device="cuda", dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 48, 300])
@pytest.mark.parametrize("sparsity", [0.3, 0.8], ids=["gathered", "masked"])
def test_bitmap_cuda_graph_capture_and_replay(tokens, sparsity):
    """BitmapLinear layers, their tiles expanded by a register gather (density >= 0.5) or by masked loads; at up to
    64 tokens the first layer's 1024 inputs split over K, so the capture holds the shares' buffers too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 256), nn.GELU(), nn.Linear(256, 32)).to(device="cuda", dtype=torch.float16)
    report = nmspmm.sparsify(model, nmspmm.BitmapConfig(sparsity=sparsity))
    assert len(report.swapped) == 2 and isinstance(model[0], nmspmm.BitmapLinear)
    _capture_and_replay(model.eval(), torch.randn(tokens, 1024, device="cuda", dtype=torch.float16))


# ---- CSR: csr_linear, csr_linear_feature_major and the SDDMM op ---------------------------------------------


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("make_weight", [csr_weight, bitmap_weight], ids=["csr", "bitmap"])
def test_unstructured_compile_fullgraph(compile_backend, make_weight):
    weight = make_weight(21, 70)  # nothing derived yet: the compiled function derives and caches it
    bias = torch.randn(21, device=DEVICE)

    def layer(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(nmspmm.linear(x, weight, bias))

    compiled = torch.compile(layer, fullgraph=True, backend=compile_backend)
    for shape in [(5, 70), (2, 7, 70)]:
        x = torch.randn(shape, device=DEVICE)
        assert relative_error(compiled(x), layer(x)) < TOLERANCE[torch.float32]


@pytest.mark.usefixtures("seeded")
def test_csr_compile_training_step():
    first, second = csr_weight(21, 70), csr_weight(3, 21)
    values = first.values.clone().requires_grad_()
    x = torch.randn(6, 70, device=DEVICE, requires_grad=True)

    def loss(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        y_t = csr_linear_feature_major(x.t(), first._with_values(values))
        return csr_linear(torch.relu(y_t.t()), second).square().sum()

    torch.compile(loss, fullgraph=True, backend="aot_eager")(x, values).backward()
    compiled_grads = (x.grad, values.grad)
    x.grad = values.grad = None
    loss(x, values).backward()
    assert relative_error(compiled_grads[0], x.grad) < TOLERANCE[torch.float32]
    assert relative_error(compiled_grads[1], values.grad) < TOLERANCE[torch.float32]


def _csr_op_samples() -> list[object]:
    backends = ["reference", "triton"] if DEVICE == "cpu" else ["auto"]
    samples = []
    for backend in backends:
        weight = csr_weight(8, 12, density=0.4)
        x = torch.randn(3, 12, device=DEVICE)
        bias = torch.randn(8, device=DEVICE)
        args = csr_op_args(weight, x, bias, backend)
        samples.append(pytest.param(csr_linear_op, args, id=f"csr_linear-{backend}"))
        feature_major = (x.t().contiguous(), *args[1:])
        samples.append(pytest.param(csr_linear_feature_major_op, feature_major, id=f"feature_major-{backend}"))
        a, b = torch.randn(8, 3, device=DEVICE), torch.randn(12, 3, device=DEVICE)
        sddmm_args = (a, b, weight.row_indices(), weight.col_indices, weight.tile_offsets(CELL), backend)
        samples.append(pytest.param(csr_sddmm_op, sddmm_args, id=f"csr_sddmm-{backend}"))
        samples.append(pytest.param(csr_sddmm_op, (*sddmm_args[:4], None, backend), id=f"csr_sddmm-derived-{backend}"))
    transposed = weight.transposed_structure()
    grad_input_args = (torch.randn(3, 8, device=DEVICE), weight.values, transposed.permutation, *transposed[:2],
                       transposed.row_order)  # fmt: skip
    samples.append(pytest.param(csr_linear_grad_input_op, grad_input_args, id="csr_linear_grad_input"))
    return samples


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("op,args", _csr_op_samples())
def test_csr_opcheck(op, args):
    torch.library.opcheck(op, args)


# ---- block-shuffled: block_shuffled_linear ------------------------------------------------------------------


def test_block_shuffled_opcheck():
    sparse, _, _ = block_weight(32, 48, (16, 16), density=0.5, device=DEVICE)
    x = torch.randn(3, 48, device=DEVICE)
    for bias in (None, torch.randn(32, device=DEVICE)):
        torch.library.opcheck(block_shuffled_linear_op, block_op_args(sparse, x, sparse.values, bias, BACKENDS[-1]))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_block_shuffled_compile_fullgraph(backend):
    torch._dynamo.reset()
    sparse, _, _ = block_weight(32, 64, (16, 32), density=0.5, device=DEVICE)
    bias = torch.randn(32, device=DEVICE)

    def layer(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(block_shuffled_linear(x, sparse, bias))

    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    for shape in [(5, 64), (2, 7, 64)]:
        x = torch.randn(shape, device=DEVICE, requires_grad=backend == "aot_eager")
        y = compiled(x)
        assert relative_error(y.detach(), layer(x).detach()) < TOLERANCE[torch.float32]
        if x.requires_grad:
            y.sum().backward()
            assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    torch._dynamo.reset()
