"""nmspmm.SparseLinear and nmspmm.sparsify: products, construction errors, moves, model swaps and their report,
fine-tuning, and state-dict round trips (also through safetensors)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import nmspmm
from conftest import DEVICE, TOLERANCE, relative_error

# On the CPU "triton" runs the kernels through the interpreter; "auto" there is the dense reference.
BACKENDS = ["auto", "triton"] if DEVICE == "cpu" else ["auto"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dense(rows: int, cols: int, bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Linear:
    return nn.Linear(cols, rows, bias=bias, device=DEVICE, dtype=dtype)


def _masked_reference(layer: nn.Linear, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float64 ``x @ (W * mask).T + b`` from the dense layer."""
    y = x.double() @ (layer.weight.detach().double() * mask).t()
    return y + layer.bias.detach().double() if layer.bias is not None else y


class Block(nn.Module):
    """A transformer-like block: attention projections and an MLP, nested two levels deep."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, device=DEVICE)
        self.attn = nn.ModuleDict({name: _dense(width, width) for name in ("q", "k", "v", "o")})
        self.mlp = nn.Sequential(_dense(2 * width, width), nn.GELU(), _dense(width, 2 * width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (self.attn[name](h) for name in "qkv")
        scores = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.attn["o"](scores @ v)
        return x + self.mlp(self.norm(x))


class TinyTransformer(nn.Module):
    def __init__(self, width: int = 32, depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = _dense(classes, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lead,rows,cols,pattern,vector",
    [((5,), 32, 64, "2:4", 16), ((2, 3), 64, 32, "6:8", 32), ((3,), 24, 32, "3:8", 1)],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_sparse_linear_matches_masked_dense(lead, rows, cols, pattern, vector, dtype, backend, with_bias):
    layer = _dense(rows, cols, with_bias, dtype)
    module = nmspmm.SparseLinear.from_dense(layer, pattern, vector, backend=backend)
    mask = nmspmm.magnitude_mask(layer.weight, pattern, vector)
    assert torch.equal(module.weight.mask(), mask)
    assert torch.equal(module.to_dense(), layer.weight.detach() * mask)
    x = torch.randn(*lead, cols, device=DEVICE).to(dtype)
    y = module(x).detach()
    assert y.shape == (*lead, rows) and y.dtype == dtype
    assert relative_error(y, _masked_reference(layer, mask, x)) < TOLERANCE[dtype]


def test_sparse_linear_from_explicit_mask():
    layer = _dense(32, 64)
    mask = nmspmm.magnitude_mask(-layer.weight.detach().abs(), "1:4", 16)  # the smallest, unlike magnitude
    module = nmspmm.SparseLinear.from_dense(layer, "1:4", 16, mask=mask)
    assert torch.equal(module.weight.mask(), mask)
    x = torch.randn(7, 64, device=DEVICE)
    assert relative_error(module(x).detach(), _masked_reference(layer, mask, x)) < TOLERANCE[torch.float32]


def test_sparse_linear_layout():
    weight = nmspmm.prune(torch.randn(64, 32, device=DEVICE), "24:32", 16)
    bias = torch.randn(64, device=DEVICE)
    module = nmspmm.SparseLinear(weight, bias)
    assert (module.in_features, module.out_features, module.pattern, module.vector) == (32, 64, "24:32", 16)
    assert isinstance(module.values, nn.Parameter) and module.values.data_ptr() == weight.values.data_ptr()
    assert isinstance(module.bias, nn.Parameter) and torch.equal(module.bias, bias)
    assert [name for name, _ in module.named_parameters()] == ["values", "bias"]
    assert set(module.state_dict()) == {"values", "offsets", "bias"}
    assert module.offsets.dtype == module.kept_offsets.dtype == torch.uint8
    assert torch.equal(module.kept_offsets, weight.kept_offsets())
    view = module.weight
    assert isinstance(view, nmspmm.NMSparseWeight) and view.values is module.values and view.shape == (64, 32)
    assert torch.equal(module.to_dense(), weight.to_dense())
    assert repr(module) == "SparseLinear(in_features=32, out_features=64, pattern='24:32', vector=16, bias=True)"
    assert nmspmm.SparseLinear(weight, backend="reference").extra_repr().endswith("bias=False, backend='reference'")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_values(backend):
    weight = nmspmm.prune(torch.randn(32, 64, device=DEVICE), "2:4", 16)
    strided = weight.values.t().contiguous().t()
    module = nmspmm.SparseLinear(nmspmm.NMSparseWeight(strided, weight.offsets, "2:4", 16, (32, 64)), backend=backend)
    assert not module.values.is_contiguous()
    x = torch.randn(5, 64, device=DEVICE)
    expected = x.double() @ weight.to_dense().double().t()
    assert relative_error(module(x).detach(), expected) < TOLERANCE[torch.float32]


def test_from_dense_keeps_requires_grad():
    layer = _dense(16, 16).requires_grad_(False)
    module = nmspmm.SparseLinear.from_dense(layer, "2:4")
    assert not module.values.requires_grad and not module.bias.requires_grad
    assert module.bias.data_ptr() != layer.bias.data_ptr()


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda: (_dense(32, 30), "2:4"), ValueError, r"weight: in_features K=30 must be divisible by m=4"),
        (lambda: (_dense(24, 32), "2:4", 16), ValueError, r"vector: V=16 must divide out_features N=24"),
        (lambda: (_dense(32, 32, dtype=torch.float64), "2:4"), TypeError, r"weight: expected dtype float16"),
        (lambda: (torch.randn(32, 32), "2:4"), TypeError, r"linear: expected a torch.nn.Linear, got Tensor"),
        (lambda: (_dense(32, 32), 0.5), TypeError, r"pattern: expected a string"),
        (lambda: (_dense(32, 32), "2:5"), ValueError, r"pattern: m must be one of"),
        (lambda: (_dense(32, 32), "2:4", 16.0), TypeError, r"vector: expected an int"),
        (
            lambda: (_dense(32, 32), "2:4", 1, torch.ones(32, 32, dtype=torch.bool, device=DEVICE)), ValueError,
            r"mask: not 2:4",
        ),
        (lambda: (_dense(32, 32), "2:4", 1, torch.ones(32, 16)), ValueError, r"mask: expected shape \(32, 32\)"),
    ],
)
def test_from_dense_rejects_bad_input(make_args, error, match):
    with pytest.raises(error, match=match):
        nmspmm.SparseLinear.from_dense(*make_args())


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda w: (w.to_dense(),), TypeError, r"weight: expected an nmspmm.NMSparseWeight, got Tensor"),
        (lambda w: (w, torch.randn(31)), ValueError, r"bias: expected shape \(32,\), got \(31,\)"),
        (lambda w: (w, torch.randn(32).half()), TypeError, r"bias: dtype torch.float16 does not match"),
        (lambda w: (w, [0.0] * 32), TypeError, r"bias: expected a torch.Tensor or None, got list"),
    ],
)
def test_constructor_rejects_bad_input(make_args, error, match):
    weight = nmspmm.prune(torch.randn(32, 64), "2:4", 16)
    with pytest.raises(error, match=match):
        nmspmm.SparseLinear(*make_args(weight))
    with pytest.raises(ValueError, match="backend: expected one of"):
        nmspmm.SparseLinear(weight, backend="cublas")


@pytest.mark.parametrize("pattern", ["2:4", "6:8"])
def test_dtype_and_device_moves_keep_offsets(pattern):
    module = nmspmm.SparseLinear.from_dense(_dense(32, 64), pattern, 16)
    kept = module.kept_offsets.clone()
    for cast, dtype in [(lambda mod: mod.half(), torch.float16), (lambda mod: mod.to(torch.bfloat16), torch.bfloat16)]:
        cast(module)
        assert module.values.dtype == module.bias.dtype == module.weight.dtype == dtype
        assert module.offsets.dtype == module.kept_offsets.dtype == torch.uint8
        assert torch.equal(module.kept_offsets, kept)
        x = torch.randn(3, 64, device=DEVICE).to(dtype)
        assert module(x).dtype == dtype
    module.to("meta")
    assert module.values.is_meta and module.offsets.is_meta and module.offsets.dtype == torch.uint8


def test_sparsify_sequential_report():
    model = nn.Sequential(_dense(64, 32), nn.ReLU(), _dense(32, 64), nn.ReLU(), _dense(10, 32), _dense(16, 30))
    reference = copy.deepcopy(model)
    report = nmspmm.sparsify(model, "2:4", vector=16)
    assert isinstance(report, nmspmm.SparsifyReport)
    assert report.swapped == ["0", "2"]
    assert report.skipped == {
        "4": "vector: V=16 must divide out_features N=10 of weight",
        "5": "weight: in_features K=30 must be divisible by m=4 of the pattern 2:4",
    }
    assert isinstance(model[0], nmspmm.SparseLinear) and isinstance(model[2], nmspmm.SparseLinear)
    assert type(model[4]) is nn.Linear and type(model[5]) is nn.Linear
    assert report.dense_bytes == (64 * 32 + 32 * 64) * 4
    assert report.sparse_bytes == model[0].weight.nbytes + model[2].weight.nbytes
    assert 0 < report.sparse_bytes < report.dense_bytes
    summary = str(report)
    assert summary.startswith("sparsify 2:4 (vector=16, magnitude): 2 linear layers swapped, 2 skipped")
    assert "16 KiB dense ->" in summary and "skipped 4: vector: V=16 must divide" in summary
    assert "\n  swapped: {0,2}\n" in summary
    for index in (0, 2):
        reference[index].weight.data *= model[index].weight.mask()
    x = torch.randn(5, 32, device=DEVICE)
    assert relative_error(model[:4](x).detach(), reference[:4](x).detach()) < TOLERANCE[torch.float32]


def test_sparsify_report_lists_swapped_layers_compactly():
    model = TinyTransformer(width=32, depth=3)
    report = nmspmm.sparsify(model, "2:4", vector=16, skip=lambda name, module: name == "blocks.2.attn.v")
    assert f"  swapped: {_compact(report)}" in str(report)
    assert _compact(report) == (
        "blocks.{0-2}.attn.q, blocks.{0-2}.attn.k, blocks.{0-1}.attn.v, blocks.{0-2}.attn.o, blocks.{0-2}.mlp.0, "
        "blocks.{0-2}.mlp.2"
    )


def _compact(report: nmspmm.SparsifyReport) -> str:
    return str(report).split("  swapped: ")[1].split("\n")[0]


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_sparsify_refuses_a_bad_layer_before_swapping_any(method):
    model = TinyTransformer(width=32, depth=2)
    with torch.no_grad():
        model.blocks[1].mlp[2].weight[3, 5] = float("nan")
    before = copy.deepcopy(model.state_dict())
    calibration = [torch.randn(4, 32, device=DEVICE)] if method == "wanda" else None
    with pytest.raises(ValueError, match=r"^blocks\.1\.mlp\.2: weight: expected finite values, got nan at row 3, "
                       r"column 5; no layer was swapped$"):
        nmspmm.sparsify(model, "2:4", vector=16, method=method, calibration=calibration)
    assert not any(isinstance(module, nmspmm.SparseLinear) for module in model.modules())
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[key], before[key]) or after[key].isnan().any() for key in before)


def test_sparsify_names_the_layer_of_a_later_error(monkeypatch):
    model = nn.Sequential(_dense(32, 32), nn.ReLU(), _dense(32, 32))

    def failing(weight, linear, **kwargs):
        if linear is model[2]:
            raise ValueError("weight: something a layer cannot be pruned for")
        return original(weight, linear, **kwargs)

    original = nmspmm.SparseLinear.of
    monkeypatch.setattr(nmspmm.SparseLinear, "of", failing)
    with pytest.raises(ValueError, match=r"^2: weight: something a layer cannot be pruned for; swapped before it: 0$"):
        nmspmm.sparsify(model, "2:4", vector=16)


def test_sparsify_nested_model_with_user_filter():
    model = TinyTransformer()
    reference = copy.deepcopy(model)
    seen = []

    def skip(name: str, module: nn.Module) -> bool:
        seen.append((name, type(module)))
        return "head" in name

    report = nmspmm.sparsify(model, "8:32", vector=16, skip=skip)
    names = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.0", "mlp.2")
    layers = [f"blocks.{i}.{name}" for i in range(2) for name in names]
    assert sorted(report.swapped) == sorted(layers)
    assert report.skipped == {"head": "user filter"}
    assert all(kind is nn.Linear for _, kind in seen) and len(seen) == len(layers) + 1
    assert isinstance(model.blocks[1].attn["q"], nmspmm.SparseLinear) and type(model.head) is nn.Linear
    assert report.sparse_bytes < report.dense_bytes / 3
    for name in layers:
        reference.get_submodule(name).weight.data *= model.get_submodule(name).weight.mask()
    x = torch.randn(2, 5, 32, device=DEVICE)
    assert relative_error(model(x).detach(), reference(x).detach()) < TOLERANCE[torch.float32]


def test_sparsify_skips_what_it_cannot_swap():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(64, 32, device=DEVICE)
            self.attention = nn.MultiheadAttention(32, 2, device=DEVICE)
            self.wide = _dense(64, 32, dtype=torch.float64)
            self.lm_head = _dense(64, 32, bias=False)
            self.lm_head.weight = self.embed.weight

    model = Tied()
    report = nmspmm.sparsify(model, "2:4")
    assert report.swapped == [] and report.dense_bytes == report.sparse_bytes == 0
    assert report.skipped == {
        "attention.out_proj": "a subclass of nn.Linear (NonDynamicallyQuantizableLinear); its owner may read .weight",
        "wide": "weight: expected dtype float16, bfloat16 or float32, got torch.float64",
        "lm_head": "weight shared (tied) with embed.weight",
    }
    assert "0 linear layers swapped, 3 skipped" in str(report)
    root = nmspmm.sparsify(_dense(32, 32), "2:4")
    assert root.skipped == {"": "the model itself is an nn.Linear; use SparseLinear.from_dense"}
    assert "skipped <model>:" in str(root)


def test_sparsify_twice_is_a_no_op():
    model = nn.Sequential(_dense(32, 32))
    nmspmm.sparsify(model, "2:4")
    report = nmspmm.sparsify(model, "1:4")
    assert report.swapped == [] and report.skipped == {} and model[0].pattern == "2:4"


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"method": "obs"}, ValueError, r"method: expected one of \('magnitude', 'wanda', 'sparsegpt'\), got 'obs'"),
        ({"method": "sparsegpt"}, ValueError, r"calibration: method 'sparsegpt' needs an iterable of input batches"),
        ({"method": "wanda"}, ValueError, r"calibration: method 'wanda' needs an iterable of input batches"),
        ({"pattern": "4:4"}, ValueError, r"pattern: n must satisfy 1 <= n < m"),
        ({"vector": 8}, ValueError, r"vector: expected one of"),
        ({"skip": "head"}, TypeError, r"skip: expected a callable"),
        ({"model": {"fc": nn.Linear(4, 4)}}, TypeError, r"model: expected a torch.nn.Module, got dict"),
    ],
)
def test_sparsify_rejects_bad_arguments(kwargs, error, match):
    arguments = {"model": nn.Sequential(_dense(32, 32)), "pattern": "2:4"} | kwargs
    with pytest.raises(error, match=match):
        nmspmm.sparsify(**arguments)


def test_sparsify_wanda_uses_the_calibration_norms(monkeypatch):
    model = nn.Sequential(_dense(32, 64), nn.ReLU(), _dense(32, 32), _dense(32, 32))
    batches = [torch.randn(4, 64, device=DEVICE) for _ in range(2)]
    calls = {}

    def collect_input_norms(model_arg, batches_arg, names):
        calls["collect"] = (model_arg, batches_arg, list(names))
        return {name: torch.rand(model_arg.get_submodule(name).in_features, device=DEVICE) for name in names}

    def wanda_mask(weight, input_norm, pattern, vector=1):
        calls.setdefault("masks", []).append((weight.shape, input_norm.shape, pattern, vector))
        return nmspmm.magnitude_mask(weight.abs() * input_norm, pattern, vector)

    monkeypatch.setattr(nmspmm.nn, "collect_input_norms", collect_input_norms)
    monkeypatch.setattr(nmspmm.nn, "wanda_mask", wanda_mask)
    dense_first = model[0].weight.detach().clone()
    report = nmspmm.sparsify(
        model, "2:8", vector=16, skip=lambda name, _: name == "3", method="wanda", calibration=batches
    )
    assert report.method == "wanda" and report.swapped == ["0", "2"] and report.skipped == {"3": "user filter"}
    assert calls["collect"][0] is model and calls["collect"][1] is batches and calls["collect"][2] == ["0", "2"]
    assert calls["masks"] == [((32, 64), (64,), "2:8", 16), ((32, 32), (32,), "2:8", 16)]
    assert not torch.equal(model[0].weight.mask(), nmspmm.magnitude_mask(dense_first, "2:8", 16))


def test_sparsify_wanda_end_to_end():
    model = nn.Sequential(_dense(32, 64), nn.ReLU(), _dense(32, 32))
    batches = [torch.randn(4, 64, device=DEVICE) for _ in range(2)]
    report = nmspmm.sparsify(model, "2:4", vector=16, method="wanda", calibration=batches)
    assert report.swapped == ["0", "2"] and report.skipped == {}
    assert model(batches[0]).shape == (4, 32)


def test_fine_tuning_updates_values_under_a_fixed_mask():
    torch.manual_seed(0)
    model = nn.Sequential(_dense(32, 64), nn.ReLU(), _dense(16, 32))
    nmspmm.sparsify(model, "2:4", vector=16)
    masks = [model[i].weight.mask() for i in (0, 2)]
    offsets = [model[i].offsets.clone() for i in (0, 2)]
    before = [model[i].values.detach().clone() for i in (0, 2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(8, 64, device=DEVICE), torch.randn(8, 16, device=DEVICE)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for index, mask, offset, old in zip((0, 2), masks, offsets, before):
        assert model[index].values.grad is not None and model[index].bias.grad is not None
        assert not torch.equal(model[index].values.detach(), old)
        assert torch.equal(model[index].offsets, offset) and torch.equal(model[index].weight.mask(), mask)
        assert torch.equal(model[index].to_dense() != 0, mask)


def _sparse_model(pattern: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(_dense(32, 64), nn.GELU(), _dense(32, 32, bias=False))
    nmspmm.sparsify(model, pattern, vector=16)
    return model


@pytest.mark.parametrize("pattern", ["2:4", "6:8"])
def test_state_dict_round_trip(pattern):
    source, target = _sparse_model(pattern, 0), _sparse_model(pattern, 1)
    state = source.state_dict()
    assert set(state) == {"0.values", "0.offsets", "0.bias", "2.values", "2.offsets"}
    assert state["0.offsets"].dtype == torch.uint8
    target.load_state_dict(state)
    for index in (0, 2):
        assert torch.equal(target[index].kept_offsets, source[index].kept_offsets)
    x = torch.randn(3, 64, device=DEVICE)
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["2:4", "24:32"])  # 24:32 stores the dropped positions: kept ones derived
def test_kept_launch_weight_follows_every_change(backend, pattern):
    # The module keeps its weight view, and the view its contiguous kept offsets, between calls: each change of
    # the weight's tensors must reach the product (a stale plan would be a silently wrong result).
    torch.manual_seed(0)
    layer = nmspmm.SparseLinear.from_dense(_dense(32, 64), pattern, 16, backend=backend)
    other = nmspmm.SparseLinear.from_dense(_dense(32, 64), pattern, 16, backend=backend)
    assert not torch.equal(layer.offsets, other.offsets)
    x = torch.randn(5, 64, device=DEVICE)

    def check(module: nn.Module, x: torch.Tensor) -> None:
        expected = x.double() @ module.to_dense().double().t() + module.bias.double()
        assert relative_error(module(x).detach(), expected) < TOLERANCE[x.dtype]

    check(layer, x)
    layer.load_state_dict(other.state_dict())  # offsets and values copied into the same tensors
    check(layer, x)
    assert torch.equal(layer(x), other(x))
    layer.values = nn.Parameter(torch.randn_like(layer.values))  # a new values tensor
    check(layer, x)
    layer.offsets = other.offsets.clone()  # a new offsets tensor: the kept offsets are derived again
    check(layer, x)
    assert torch.equal(layer.weight.mask(), other.weight.mask())
    with torch.no_grad():
        layer.values.data = torch.randn_like(layer.values)  # new storage under the same Parameter
    check(layer, x)
    layer.half()
    check(layer, x.half())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["2:4", "24:32"])  # offsets stored kept, and dropped (kept ones derived)
def test_weight_given_new_offsets_derives_them_again(backend, pattern):
    weight = nmspmm.prune(torch.randn(32, 64, device=DEVICE), pattern, 16)
    other = nmspmm.prune(torch.randn(32, 64, device=DEVICE), pattern, 16)
    x = torch.randn(3, 64, device=DEVICE)
    nmspmm.linear(x, weight, backend=backend)
    weight.offsets = other.offsets
    fresh = nmspmm.NMSparseWeight(weight.values, other.offsets, pattern, 16, weight.shape)  # derives them anew
    expected = x.double() @ fresh.to_dense().double().t()
    assert torch.equal(weight.to_dense(), fresh.to_dense())
    assert relative_error(nmspmm.linear(x, weight, backend=backend), expected) < TOLERANCE[torch.float32]


def test_safetensors_round_trip(tmp_path):
    source, target = _sparse_model("6:8", 0), _sparse_model("6:8", 1)
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    target.load_state_dict(load_file(tmp_path / "model.safetensors", device=DEVICE))
    x = torch.randn(3, 64, device=DEVICE)
    assert torch.equal(target(x), source(x))


def _out_of_range(state: dict[str, torch.Tensor]) -> None:
    state["0.offsets"][0, 0, 0] = 8


def _not_ascending(state: dict[str, torch.Tensor]) -> None:
    state["0.offsets"][0, 0] = state["0.offsets"][0, 0].flip(0)


def _wrong_values_shape(state: dict[str, torch.Tensor]) -> None:
    state["0.values"] = state["0.values"][:, :-1]


def _float_offsets(state: dict[str, torch.Tensor]) -> None:
    state["2.offsets"] = state["2.offsets"].float()


def _offsets_of_another_pattern(state: dict[str, torch.Tensor]) -> None:
    state["2.offsets"] = _sparse_model("2:4", 2).state_dict()["2.offsets"]


@pytest.mark.parametrize(
    "corrupt,layer,match",
    [
        (_out_of_range, "0", r"offsets: every offset must be < m=8, got max 8"),
        (_not_ascending, "0", r"offsets: must be strictly ascending"),
        (_wrong_values_shape, "0", r"values: expected shape \(32, 48\), got \(32, 47\)"),
        (_float_offsets, "2", r"offsets: expected a uint8 tensor, got torch.float32"),
        (_offsets_of_another_pattern, "2", r"offsets: expected shape \(2, 4, 2\), got \(2, 8, 2\)"),
    ],
)
def test_corrupted_state_dict_refused(corrupt, layer, match):
    source, target = _sparse_model("6:8", 0), _sparse_model("6:8", 1)
    state = {key: value.clone() for key, value in source.state_dict().items()}
    corrupt(state)
    before = {key: value.clone() for key, value in target.state_dict().items()}
    prefix = rf"state_dict: {layer}\.values and {layer}\.offsets are not a 6:8 weight with vector=16 and shape "
    with pytest.raises(ValueError, match=prefix + r"\(32, \d+\): " + match):
        target.load_state_dict(state)
    # Layers load in order (as in torch): the refused one keeps its tensors.
    for key in (f"{layer}.values", f"{layer}.offsets"):
        assert torch.equal(target.state_dict()[key], before[key])


def _three_layer_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 48), nn.Linear(48, 20)).to(DEVICE)


FORMAT_CASES = [
    ({"pattern": "csr", "sparsity": 0.9}, nmspmm.nn.CSRLinear, ["0", "2", "3"]),
    ({"pattern": "block", "sparsity": 0.75, "block": (16, 16)}, nmspmm.nn.BlockShuffledLinear, ["0", "2"]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,module_type,swapped", FORMAT_CASES)
def test_sparsify_other_formats_matches_masked_dense(kwargs, module_type, swapped, backend):
    model = _three_layer_model(0)
    dense = {
        name: layer.weight.detach().clone() for name, layer in model.named_children() if isinstance(layer, nn.Linear)
    }
    report = nmspmm.sparsify(model, **kwargs)
    assert report.swapped == swapped and report.sparse_bytes < report.dense_bytes
    assert f"sparsity={kwargs['sparsity']:.1%}" in str(report)
    x = torch.randn(7, 64, device=DEVICE)
    for name in swapped:
        layer = model.get_submodule(name)
        assert isinstance(layer, module_type)
        layer.backend = backend
        mask = layer.weight.mask()
        assert 1 - mask.float().mean().item() == pytest.approx(kwargs["sparsity"], abs=0.01)
        assert torch.equal(layer.to_dense(), dense[name] * mask)
        inputs = torch.randn(7, layer.in_features, device=DEVICE)
        expected = inputs.double() @ layer.to_dense().double().t() + layer.bias.double()
        assert relative_error(layer(inputs), expected) < TOLERANCE[torch.float32]
    assert model(x).shape == (7, 20)


@pytest.mark.parametrize("kwargs,module_type,swapped", FORMAT_CASES)
def test_other_formats_fine_tune_and_round_trip(kwargs, module_type, swapped, tmp_path):
    model = _three_layer_model(1)
    nmspmm.sparsify(model, **kwargs)
    first = model.get_submodule(swapped[0])
    structure = first.weight.mask().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 64, device=DEVICE)
    before = first.values.detach().clone()
    model(x).square().mean().backward()
    optimizer.step()
    assert not torch.equal(first.values.detach(), before) and torch.equal(first.weight.mask(), structure)

    target = _three_layer_model(2)
    nmspmm.sparsify(target, **kwargs)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    target.load_state_dict(torch.load(tmp_path / "model.pt"))
    with torch.no_grad():
        assert torch.equal(target(x), model(x))
        half = target.half()
        assert half(x.half()).dtype == torch.float16


@pytest.mark.parametrize(
    "kwargs,corrupt,match",
    [
        (FORMAT_CASES[0][0], lambda s: s["0.col_indices"].fill_(64), r"0.values, 0.col_indices and 0.row_offsets"),
        (
            FORMAT_CASES[1][0], lambda s: s["0.row_permutation"].fill_(0),
            r"0.values, 0.block_columns, .*row_permutation",
        ),
    ],
)
def test_other_formats_refuse_corrupted_state(kwargs, corrupt, match):
    source, target = _three_layer_model(0), _three_layer_model(1)
    nmspmm.sparsify(source, **kwargs)
    nmspmm.sparsify(target, **kwargs)
    state = {key: value.clone() for key, value in source.state_dict().items()}
    corrupt(state)
    with pytest.raises(ValueError, match=rf"state_dict: {match} are not a"):
        target.load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"pattern": "csr"}, ValueError, r"sparsity: pattern 'csr' needs the fraction of weights to prune"),
        ({"pattern": "csr", "sparsity": 1.0}, ValueError, r"sparsity: expected a float in \[0, 1\)"),
        ({"pattern": "block", "sparsity": 0.5, "block": (8, 8)}, ValueError, r"block"),
        (
            {"pattern": "csr", "sparsity": 0.5, "method": "wanda"}, ValueError,
            r"calibration: method 'wanda' needs an iterable of input batches",
        ),
        ({"pattern": "csr", "sparsity": 0.5, "vector": 16}, ValueError, r"vector: applies to n:m patterns only"),
        ({"pattern": "2:4", "sparsity": 0.5}, ValueError, r"sparsity: an n:m pattern fixes the sparsity"),
    ],
)
def test_sparsify_other_formats_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        nmspmm.sparsify(_three_layer_model(0), **kwargs)


def test_compile_csr_model_fullgraph():
    model = _three_layer_model(3)
    nmspmm.sparsify(model, "csr", sparsity=0.8)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(5, 64, device=DEVICE)
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < TOLERANCE[torch.float32]
    torch._dynamo.reset()


def test_sparsify_takes_config_objects_like_its_short_form():
    for config, short, swapped in [
        (nmspmm.NMConfig("8:32", 16), {"pattern": "8:32", "vector": 16}, 12),  # the 10-output head: V=16 won't fit
        (nmspmm.CSRConfig(0.9), {"pattern": "csr", "sparsity": 0.9}, 13),
        (nmspmm.BlockConfig(0.5, (16, 16), search=False), None, 12),
    ]:
        by_config, by_string = TinyTransformer(), TinyTransformer()
        by_string.load_state_dict(by_config.state_dict())
        report = nmspmm.sparsify(by_config, config)
        if short is not None:
            expected = nmspmm.sparsify(by_string, **short)
            assert report.swapped == expected.swapped and report.sparse_bytes == expected.sparse_bytes
            assert str(report) == str(expected)
        assert len(report.swapped) == swapped
        assert all(type(by_config.get_submodule(name)).__name__.endswith("Linear") for name in report.swapped)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: nmspmm.NMConfig("4:4"), ValueError, r"pattern: n must satisfy 1 <= n < m"),
        (lambda: nmspmm.NMConfig("2:4", 8), ValueError, r"vector: expected one of"),
        (lambda: nmspmm.NMConfig("2:4", method="obs"), ValueError, r"method: expected one of"),
        (lambda: nmspmm.CSRConfig(1.0), ValueError, r"sparsity: expected a float in \[0, 1\)"),
        (lambda: nmspmm.BlockConfig(0.5, (8, 8)), ValueError, r"block"),
        (lambda: nmspmm.sparsify(TinyTransformer(), nmspmm.CSRConfig(0.5), vector=16), TypeError,
         r"vector: part of the config when one is given"),
        (lambda: nmspmm.sparsify(TinyTransformer(), 0.5), TypeError,
         r"pattern: expected an 'n:m', 'csr', 'bitmap' or 'block'"),
        (lambda: nmspmm.sparsify(TinyTransformer(), nmspmm.NMConfig("2:4", 16, "wanda")), ValueError,
         r"calibration: method 'wanda' needs an iterable of input batches"),
        (lambda: nmspmm.NMConfig("2:4", damping=0.1), ValueError,
         r"damping: SparseGPT's settings, for method='sparsegpt' only; got method='magnitude'"),
        (lambda: nmspmm.CSRConfig(0.5, "wanda", columns=64), ValueError, r"columns: SparseGPT's settings"),
        (lambda: nmspmm.NMConfig("2:4", 1, "sparsegpt", damping=1.5), ValueError,
         r"damping: expected a number in \(0, 1\), got 1.5"),
        (lambda: nmspmm.NMConfig("8:32", 1, "sparsegpt", columns=48), ValueError,
         r"columns: expected a positive multiple of 32, got 48"),
        (lambda: nmspmm.BlockConfig(0.5, (16, 16), method="sparsegpt", columns=24), ValueError,
         r"columns: expected a positive multiple of 16, got 24"),
        (lambda: nmspmm.CSRConfig(0.5, "sparsegpt", columns=0), ValueError,
         r"columns: expected a positive multiple of 1, got 0"),
    ],
)
def test_configs_reject_bad_fields(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_config_of_ones_own_swaps_through_the_same_loop():
    class WideOnly(nmspmm.SparsifyConfig):
        """2:4 V=16, but only for layers with at least 64 outputs."""

        def fits(self, weight):
            if weight.shape[0] < 64:
                raise ValueError(f"fewer than 64 outputs ({weight.shape[0]})")

        def make(self, linear, input_norm=None):
            return nmspmm.SparseLinear.from_dense(linear, "2:4", 16)

        def describe(self):
            return {"pattern": "2:4", "vector": 16, "method": "magnitude", "sparsity": None}

    model = TinyTransformer()
    report = nmspmm.sparsify(model, WideOnly())
    assert report.swapped == ["blocks.0.mlp.0", "blocks.1.mlp.0"]
    assert report.skipped["head"] == "fewer than 64 outputs (10)"


def test_sparsify_draws_progress_when_asked(capsys):
    nmspmm.sparsify(TinyTransformer(), "2:4", vector=16, progress=True)
    err = capsys.readouterr().err
    assert "12/12 sparsify 2:4: done" in err and "0/12 sparsify 2:4: blocks.0.attn.q" in err
    nmspmm.sparsify(TinyTransformer(), "2:4", vector=16, progress=False)
    assert capsys.readouterr().err == ""


def _correlated_inputs(count: int, tokens: int, width: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Batches of inputs with correlated features of unequal scales, where reconstruction matters."""
    mix = torch.randn(width, width, generator=generator) / width**0.5 + torch.eye(width)
    scale = torch.rand(width, generator=generator) * 2 + 0.1
    return [((torch.randn(tokens, width, generator=generator) @ mix) * scale).to(DEVICE) for _ in range(count)]


@pytest.mark.parametrize(
    ("pattern", "kwargs"),
    [("2:4", {"vector": 16}), ("4:8", {}), ("csr", {"sparsity": 0.6}), ("block", {"sparsity": 0.5, "block": (16, 16)})],
)
def test_sparsify_sparsegpt_keeps_the_model_closer_than_wanda_and_magnitude(pattern, kwargs):
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(_dense(64, 64), nn.GELU(), _dense(64, 64), nn.GELU(), _dense(32, 64))
    batches = _correlated_inputs(12, 32, 64, generator)
    calibration, evaluation = batches[:8], torch.cat(batches[8:])  # one distribution, tokens not calibrated on
    with torch.no_grad():
        expected = model(evaluation).double()
    errors = {}
    for method in nmspmm.nn.METHODS:
        pruned = copy.deepcopy(model)
        report = nmspmm.sparsify(pruned, pattern, method=method,
                                 calibration=None if method == "magnitude" else calibration, **kwargs)
        assert report.method == method and report.swapped == ["0", "2", "4"]
        with torch.no_grad():
            errors[method] = relative_error(pruned(evaluation).double(), expected)
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors


@pytest.mark.parametrize(
    ("config", "prune"),
    [
        (nmspmm.NMConfig("2:4", 16, "sparsegpt", damping=0.1, columns=8),
         lambda w, g: nmspmm.prune.sparsegpt(w, g, "2:4", 16, damping=0.1, columns=8)),
        (nmspmm.CSRConfig(0.6, "sparsegpt", damping=0.05, columns=16),
         lambda w, g: nmspmm.prune.sparsegpt_csr(w, g, 0.6, damping=0.05, columns=16)),
        (nmspmm.BlockConfig(0.5, (16, 16), method="sparsegpt", damping=0.2, columns=32),
         lambda w, g: nmspmm.prune.sparsegpt_block_shuffled(w, g, 0.5, (16, 16), damping=0.2, columns=32)),
    ],
)
def test_sparsify_passes_sparsegpt_settings_to_the_reconstruction(config, prune):
    # A config's damping and columns reach the reconstruction: the swapped layer is the pruning function's result
    # with those settings, and differs from the defaults'.
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = nn.Sequential(_dense(64, 64))
    calibration = _correlated_inputs(4, 32, 64, generator)
    gram = nmspmm.prune.collect_input_grams(model, calibration)["0"]  # one layer: the inputs sparsify sees
    weight = model[0].weight.detach().clone()
    nmspmm.sparsify(model, config, calibration=calibration)
    expected = prune(weight, gram).to_dense()
    assert relative_error(model[0].to_dense().detach(), expected) < 1e-6
    defaults = type(config)(**{**config.__dict__, "damping": None, "columns": None})
    assert relative_error(defaults.reconstruct(weight, gram).to_dense(), expected) > 1e-3


def test_sparsify_sparsegpt_leaves_the_model_as_it_was_on_an_error(monkeypatch):
    model = nn.Sequential(_dense(32, 32), nn.ReLU(), _dense(32, 32), nn.ReLU(), _dense(32, 32))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    original = nmspmm.nn.sparsegpt

    def failing(weight, gram, pattern, vector, **settings):
        if weight.data_ptr() == model[4].weight.data_ptr():
            raise ValueError("gram: something a layer cannot be pruned for")
        return original(weight, gram, pattern, vector, **settings)

    monkeypatch.setattr(nmspmm.nn, "sparsegpt", failing)
    with pytest.raises(ValueError, match=r"^4: gram: something a layer cannot be pruned for; no layer was swapped$"):
        nmspmm.sparsify(model, "2:4", method="sparsegpt", calibration=[torch.randn(8, 32, device=DEVICE)])
    assert all(type(module) is not nmspmm.SparseLinear for module in model)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
