"""The custom ops under torch.compile (no graph breaks), torch.library.opcheck, and CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmspmm
from conftest import DEVICE, TOLERANCE, relative_error
from nmspmm.ops import nm_linear_feature_major_op, nm_linear_op


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
        "int n, int m, int vector, str backend) -> Tensor"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 48, 300])
def test_cuda_graph_capture_and_replay(tokens):
    model = _model(torch.float16)
    x_static = torch.randn(tokens, 64, device="cuda", dtype=torch.float16)
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
