"""nmspmm.BitmapLinear, nmspmm.BitmapConfig and sparsify(model, "bitmap", ...): the module's products and gradients
against float64 dense references, construction errors, moves, kept weight views, state-dict round trips and the
refusal of tampered ones, sparsify (the short form and the config, every method, the skip rules), densify,
save_pretrained / load_pretrained, meta skeletons and torch.compile; also nmspmm.linear's dispatch of a BitmapWeight.
On the CPU "triton" runs the kernels through the interpreter; "auto" there is the dense reference."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import nmspmm
from conftest import DEVICE, TOLERANCE, relative_error
from nmspmm.ops.bitmap import bitmap_linear, bitmap_linear_feature_major

BACKENDS = ["auto", "triton"] if DEVICE == "cpu" else ["auto"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dense(rows: int, cols: int, bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Linear:
    return nn.Linear(cols, rows, bias=bias, device=DEVICE, dtype=dtype)


def _reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float64 ``x @ W.T + b`` over the module's dense weight."""
    y = x.double() @ module.to_dense().detach().double().t()
    return y + module.bias.detach().double() if module.bias is not None else y


def _three_layer_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 48), nn.Linear(48, 20)).to(DEVICE)


def _layer(seed: int = 0, rows: int = 21, cols: int = 70, sparsity: float = 0.7, **kwargs) -> nmspmm.BitmapLinear:
    torch.manual_seed(seed)
    return nmspmm.BitmapLinear.from_dense(_dense(rows, cols), sparsity, **kwargs)


# ---- the module: products, gradients, construction ------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(0,), (1,), (7,), (2, 3)])
@pytest.mark.parametrize("cols,with_bias", [(70, True), (200, False)])
def test_bitmap_linear_module_matches_float64(backend, dtype, lead, cols, with_bias):
    torch.manual_seed(0)
    layer = _dense(21, cols, bias=with_bias, dtype=dtype)
    module = nmspmm.BitmapLinear.from_dense(layer, sparsity=0.7, backend=backend)
    mask = module.weight.mask()
    assert torch.equal(module.to_dense(), layer.weight.detach() * mask)
    assert 1 - mask.float().mean().item() == pytest.approx(0.7, abs=0.01)
    x = torch.randn(*lead, cols, device=DEVICE).to(dtype)
    with torch.no_grad():
        y = module(x)
    assert y.shape == (*lead, 21) and y.dtype == dtype and y.is_contiguous()
    if x.numel():
        assert relative_error(y, _reference(module, x)) < TOLERANCE[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 3)])
def test_bitmap_linear_module_gradients(backend, dtype, lead):
    torch.manual_seed(1)
    module = nmspmm.BitmapLinear.from_dense(_dense(21, 70, dtype=dtype), 0.6, backend=backend)
    mask = module.weight.mask()
    x = torch.randn(*lead, 70, device=DEVICE).to(dtype).requires_grad_()
    grad_y = torch.randn(*lead, 21, device=DEVICE).to(dtype)
    module(x).backward(grad_y)

    dense_w = module.to_dense().detach().double().requires_grad_()
    bias = module.bias.detach().double().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    (x_ref @ dense_w.t() + bias).backward(grad_y.double())
    assert x.grad.shape == x.shape and module.values.grad.shape == module.values.shape
    assert relative_error(x.grad, x_ref.grad) < TOLERANCE[dtype]
    assert relative_error(module.values.grad, dense_w.grad[mask]) < TOLERANCE[dtype]
    assert relative_error(module.bias.grad, bias.grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)])
def test_empty_batches_behave_like_nn_linear(backend, shape):
    module = _layer(rows=32, cols=64, sparsity=0.75, backend=backend)
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    y = module(x)
    assert y.shape == (*shape[:-1], 32)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and not bool(parameter.grad.any()), name


def test_from_dense_with_an_explicit_mask_and_the_layout():
    torch.manual_seed(2)
    layer = _dense(21, 70)
    mask = torch.rand(21, 70, device=DEVICE) < 0.3
    module = nmspmm.BitmapLinear.from_dense(layer, 0.5, mask)  # the mask decides, not the sparsity
    weight = module.weight
    assert isinstance(weight, nmspmm.BitmapWeight) and torch.equal(weight.mask(), mask)
    assert isinstance(module.values, nn.Parameter) and module.values.shape == (int(mask.sum()),)
    assert dict(module.named_buffers()).keys() == {"bitmap", "block_offsets"}
    assert module.bitmap.shape == (21, 3) and module.block_offsets.shape == (21, 1)
    assert module.bitmap.dtype == module.block_offsets.dtype == torch.int32
    assert set(module.state_dict()) == {"values", "bias", "bitmap", "block_offsets"}
    assert torch.equal(module.to_dense(), layer.weight.detach() * mask)
    assert torch.equal(module.bias, layer.bias) and module.bias.data_ptr() != layer.bias.data_ptr()
    assert repr(module) == f"BitmapLinear(in_features=70, out_features=21, nnz={int(mask.sum())}, bias=True)"
    # Pruned by magnitude, it keeps the entries CSR keeps.
    pruned, csr = nmspmm.BitmapLinear.from_dense(layer, 0.7), nmspmm.CSRLinear.from_dense(layer, 0.7)
    assert torch.equal(pruned.weight.mask(), csr.weight.mask()) and torch.equal(pruned.values, csr.values)
    # The constructor shares the weight's tensors.
    shared = nmspmm.BitmapLinear(weight, module.bias.detach())
    assert shared.values.data_ptr() == weight.values.data_ptr() and shared.bitmap is weight.bitmap


def test_from_dense_keeps_requires_grad():
    layer = _dense(16, 64)
    layer.weight.requires_grad_(False)
    module = nmspmm.BitmapLinear.from_dense(layer, 0.5)
    assert not module.values.requires_grad and module.bias.requires_grad


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: nmspmm.BitmapLinear.from_dense(torch.randn(8, 8), 0.5), TypeError,
         r"linear: expected a torch.nn.Linear, got Tensor"),
        (lambda: nmspmm.BitmapLinear.from_dense(_dense(8, 8), 1.0), ValueError,
         r"sparsity: expected a float in \[0, 1\)"),
        (lambda: nmspmm.BitmapLinear.from_dense(_dense(8, 8, dtype=torch.float64), 0.5), TypeError,
         r"weight: expected dtype float16, bfloat16 or float32"),
        (lambda: nmspmm.BitmapLinear(nmspmm.prune.prune_csr(torch.randn(8, 8, device=DEVICE), 0.5)), TypeError,
         r"weight: expected an nmspmm.BitmapWeight, got CSRWeight"),
        (lambda: nmspmm.CSRLinear(nmspmm.prune.prune_bitmap(torch.randn(8, 8, device=DEVICE), 0.5)), TypeError,
         r"weight: expected an nmspmm.CSRWeight, got BitmapWeight"),
        (lambda: nmspmm.BitmapLinear(nmspmm.prune.prune_bitmap(torch.randn(8, 8, device=DEVICE), 0.5),
                                     torch.randn(7, device=DEVICE)), ValueError, r"bias: expected shape \(8,\)"),
        (lambda: nmspmm.BitmapLinear(nmspmm.prune.prune_bitmap(torch.randn(8, 8, device=DEVICE), 0.5),
                                     backend="dense"), ValueError, r"backend: expected one of"),
    ],
)
def test_construction_rejects_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_moves_and_casts_keep_the_int32_buffers():
    module = _layer(3)
    bitmap, offsets = module.bitmap.clone(), module.block_offsets.clone()
    x = torch.randn(5, 70, device=DEVICE)
    for dtype, cast in [(torch.float16, lambda m: m.half()), (torch.bfloat16, lambda m: m.to(torch.bfloat16)),
                        (torch.float32, lambda m: m.float())]:
        cast(module)
        assert module.values.dtype == module.bias.dtype == module.weight.dtype == dtype
        assert torch.equal(module.bitmap, bitmap) and torch.equal(module.block_offsets, offsets)
        assert module.bitmap.dtype == module.block_offsets.dtype == torch.int32
        with torch.no_grad():
            y = module(x.to(dtype))
        assert y.dtype == dtype and relative_error(y, _reference(module, x.to(dtype))) < TOLERANCE[dtype]
    module.to("meta")
    assert module.values.is_meta and module.bitmap.is_meta and module.bitmap.dtype == torch.int32


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_launch_weight_follows_every_change(backend):
    # The module keeps its weight view (and the view its plans and derived structures) between calls: each change
    # of the module's tensors must reach the product.
    layer, other = _layer(4, backend=backend), _layer(5, backend=backend)
    assert not torch.equal(layer.bitmap, other.bitmap)
    x = torch.randn(5, 70, device=DEVICE)

    def check(module: nn.Module, x: torch.Tensor) -> None:
        with torch.no_grad():
            assert relative_error(module(x), _reference(module, x)) < TOLERANCE[x.dtype]

    check(layer, x)
    assert layer._launch_weight() is layer._launch_weight()  # kept between calls
    layer.load_state_dict(other.state_dict())  # every tensor copied into the module's own
    check(layer, x)
    with torch.no_grad():
        assert torch.equal(layer(x), other(x))
    layer.values = nn.Parameter(torch.randn_like(layer.values))  # a new values tensor
    check(layer, x)
    third = _layer(6, backend=backend)
    layer.bitmap, layer.block_offsets = third.bitmap.clone(), third.block_offsets.clone()  # new index tensors
    layer.values = nn.Parameter(third.values.detach().clone())
    check(layer, x)
    assert torch.equal(layer.weight.mask(), third.weight.mask())
    with torch.no_grad():
        layer.values.data = torch.randn_like(layer.values)  # new storage under the same Parameter
    check(layer, x)
    # Gradients after inference: the derived backward structures follow the new structure too.
    x_grad = x.clone().requires_grad_()
    layer(x_grad).sum().backward()
    expected = layer.to_dense().detach().double().sum(0).expand(5, 70)
    assert relative_error(x_grad.grad, expected) < TOLERANCE[torch.float32]
    layer.half()
    check(layer, x.half())


# ---- state dicts ----------------------------------------------------------------------------------------------


def _sparse_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(_dense(33, 70), nn.GELU(), _dense(32, 33, bias=False))
    nmspmm.sparsify(model, "bitmap", sparsity=0.7)
    return model


def test_state_dict_round_trip(tmp_path):
    source, target = _sparse_model(0), _sparse_model(1)
    state = source.state_dict()
    assert set(state) == {"0.values", "0.bitmap", "0.block_offsets", "0.bias", "2.values", "2.bitmap",
                          "2.block_offsets"}
    assert state["0.bitmap"].dtype == state["0.block_offsets"].dtype == torch.int32
    target.load_state_dict(state)
    x = torch.randn(3, 70, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    for index in (0, 2):
        assert torch.equal(target[index].weight.mask(), source[index].weight.mask())
    torch.save(source.state_dict(), tmp_path / "model.pt")
    again = _sparse_model(2)
    again.load_state_dict(torch.load(tmp_path / "model.pt"))
    with torch.no_grad():
        assert torch.equal(again(x), source(x))


def _bit_beyond_k(state: dict[str, torch.Tensor]) -> None:
    state["0.bitmap"][0, -1] |= 1 << 20  # K=70: the last word holds inputs 64..69 only


def _wrong_block_offsets(state: dict[str, torch.Tensor]) -> None:
    state["0.block_offsets"][1, 0] += 1


def _fewer_values(state: dict[str, torch.Tensor]) -> None:
    state["0.values"] = state["0.values"][:-1]


def _float_bitmap(state: dict[str, torch.Tensor]) -> None:
    state["2.bitmap"] = state["2.bitmap"].float()


def _bitmap_of_another_shape(state: dict[str, torch.Tensor]) -> None:
    state["2.bitmap"] = state["2.bitmap"][:, :1].clone()


@pytest.mark.parametrize(
    "corrupt,layer,shape,match",
    [
        (_bit_beyond_k, "0", "(33, 70)", r"bitmap: bits at inputs >= K=70 must be zero, but word 2 of row 0"),
        (_wrong_block_offsets, "0", "(33, 70)", r"block_offsets: expected the index in values of each row's first"),
        (_fewer_values, "0", "(33, 70)", r"values: expected nnz=\d+ entries \(the bits set in bitmap\), got \d+"),
        (_float_bitmap, "2", "(32, 33)", r"bitmap: expected an int32 tensor, got torch.float32"),
        (_bitmap_of_another_shape, "2", "(32, 33)", r"bitmap: expected shape \(32, 2\), got \(32, 1\)"),
    ],
)
def test_tampered_state_dict_refused(corrupt, layer, shape, match):
    source, target = _sparse_model(0), _sparse_model(1)
    state = {key: value.clone() for key, value in source.state_dict().items()}
    corrupt(state)
    before = {key: value.clone() for key, value in target.state_dict().items()}
    prefix = (rf"state_dict: {layer}\.values, {layer}\.bitmap and {layer}\.block_offsets are not a BitmapWeight with "
              rf"shape {re.escape(shape)}: ")
    with pytest.raises(ValueError, match=prefix + match):
        target.load_state_dict(state)
    for key in (f"{layer}.values", f"{layer}.bitmap", f"{layer}.block_offsets"):  # the refused layer is unchanged
        assert torch.equal(target.state_dict()[key], before[key])


def test_state_dict_of_another_format_refused():
    target = _sparse_model(0)
    csr = nn.Sequential(_dense(33, 70), nn.GELU(), _dense(32, 33, bias=False))
    nmspmm.sparsify(csr, "csr", sparsity=0.7)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"0.bitmap\""):
        target.load_state_dict(csr.state_dict())


# ---- sparsify, configs and methods ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparsify_bitmap_matches_masked_dense(backend):
    model = _three_layer_model(0)
    dense = {
        name: layer.weight.detach().clone() for name, layer in model.named_children() if isinstance(layer, nn.Linear)
    }
    report = nmspmm.sparsify(model, "bitmap", sparsity=0.9)
    assert report.swapped == ["0", "2", "3"] and report.skipped == {}
    assert report.pattern == "bitmap" and report.sparsity == 0.9 and report.method == "magnitude"
    assert report.dense_bytes == sum(weight.numel() * 4 for weight in dense.values())
    assert report.sparse_bytes == sum(model.get_submodule(name).weight.nbytes for name in report.swapped)
    assert 0 < report.sparse_bytes < report.dense_bytes
    assert str(report).startswith("sparsify bitmap (sparsity=90.0%, magnitude): 3 linear layers swapped, 0 skipped")
    for name in report.swapped:
        layer = model.get_submodule(name)
        assert type(layer) is nmspmm.BitmapLinear
        layer.backend = backend
        mask = layer.weight.mask()
        assert 1 - mask.float().mean().item() == pytest.approx(0.9, abs=0.01)
        assert torch.equal(layer.to_dense(), dense[name] * mask)
        inputs = torch.randn(7, layer.in_features, device=DEVICE)
        with torch.no_grad():
            assert relative_error(layer(inputs), _reference(layer, inputs)) < TOLERANCE[torch.float32]
    assert model(torch.randn(7, 64, device=DEVICE)).shape == (7, 20)


def test_sparsify_takes_the_config_like_its_short_form_and_keeps_csrs_entries():
    by_config, by_string, by_csr = _three_layer_model(1), _three_layer_model(1), _three_layer_model(1)
    report = nmspmm.sparsify(by_config, nmspmm.BitmapConfig(sparsity=0.8))
    expected = nmspmm.sparsify(by_string, "bitmap", sparsity=0.8)
    assert str(report) == str(expected) and report.sparse_bytes == expected.sparse_bytes
    nmspmm.sparsify(by_csr, nmspmm.CSRConfig(0.8))
    for name in report.swapped:
        module = by_config.get_submodule(name)
        assert torch.equal(module.to_dense(), by_string.get_submodule(name).to_dense())
        assert torch.equal(module.to_dense(), by_csr.get_submodule(name).to_dense())
    assert nmspmm.BitmapConfig(0.8) != nmspmm.CSRConfig(0.8)
    assert repr(nmspmm.BitmapConfig(0.8)) == (
        "BitmapConfig(sparsity=0.8, method='magnitude', damping=None, columns=None)"
    )
    assert nmspmm.BitmapConfig in nmspmm.nn.CONFIGS and "bitmap" in nmspmm.nn.FORMATS


def test_sparsify_bitmap_skips_what_it_cannot_swap():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(64, 32, device=DEVICE)
            self.attention = nn.MultiheadAttention(32, 2, device=DEVICE)
            self.wide = _dense(64, 32, dtype=torch.float64)
            self.lm_head = _dense(64, 32, bias=False)
            self.lm_head.weight = self.embed.weight
            self.head = _dense(10, 32)
            self.odd = _dense(7, 13)  # any shape fits an unstructured format

    model = Tied()
    report = nmspmm.sparsify(model, "bitmap", sparsity=0.5, skip=lambda name, module: name == "head")
    assert report.swapped == ["odd"]
    assert report.skipped == {
        "attention.out_proj": "a subclass of nn.Linear (NonDynamicallyQuantizableLinear); its owner may read .weight",
        "wide": "weight: expected dtype float16, bfloat16 or float32, got torch.float64",
        "lm_head": "weight shared (tied) with embed.weight",
        "head": "user filter",
    }
    assert type(model.odd) is nmspmm.BitmapLinear and type(model.head) is nn.Linear
    root = nmspmm.sparsify(_dense(32, 32), "bitmap", sparsity=0.5)
    assert root.skipped == {"": "the model itself is an nn.Linear; use SparseLinear.from_dense"}
    again = nmspmm.sparsify(model, "bitmap", sparsity=0.9, skip=lambda name, module: name == "head")
    assert again.swapped == [] and model.odd.values.numel() == round(0.5 * 7 * 13)  # a second call: a no-op


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({}, ValueError, r"sparsity: pattern 'bitmap' needs the fraction of weights to prune, got None"),
        ({"sparsity": 1.0}, ValueError, r"sparsity: expected a float in \[0, 1\)"),
        ({"sparsity": 0.5, "method": "wanda"}, ValueError, r"calibration: method 'wanda' needs an iterable"),
        ({"sparsity": 0.5, "method": "sparsegpt"}, ValueError, r"calibration: method 'sparsegpt' needs an iterable"),
        ({"sparsity": 0.5, "method": "obs"}, ValueError, r"method: expected one of"),
        ({"sparsity": 0.5, "vector": 16}, ValueError, r"vector: applies to n:m patterns only; pattern 'bitmap'"),
        ({"sparsity": 0.5, "weight_dtype": torch.int8}, ValueError,
         r"weight_dtype: quantized values are for n:m patterns; pattern 'bitmap' takes None"),
        ({"pattern": "Bitmap", "sparsity": 0.5}, ValueError,
         r"pattern: expected 'bitmap' \(lower case\), got 'Bitmap'"),
        ({"pattern": "bitmaps", "sparsity": 0.5}, ValueError, r"or 'csr', 'bitmap' or 'block' for the other formats"),
    ],
)
def test_sparsify_bitmap_rejects_bad_arguments(kwargs, error, match):
    model = _three_layer_model(0)
    with pytest.raises(error, match=match):
        nmspmm.sparsify(model, **({"pattern": "bitmap"} | kwargs))
    assert not any(isinstance(module, nmspmm.BitmapLinear) for module in model.modules())


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: nmspmm.BitmapConfig(1.0), ValueError, r"sparsity: expected a float in \[0, 1\)"),
        (lambda: nmspmm.BitmapConfig(0.5, "obs"), ValueError, r"method: expected one of"),
        (lambda: nmspmm.BitmapConfig(0.5, "wanda", columns=64), ValueError, r"columns: SparseGPT's settings"),
        (lambda: nmspmm.BitmapConfig(0.5, "sparsegpt", columns=0), ValueError,
         r"columns: expected a positive multiple of 1, got 0"),
        (lambda: nmspmm.BitmapConfig(0.5, "sparsegpt", damping=2.0), ValueError, r"damping: expected a number in"),
        (lambda: nmspmm.sparsify(_three_layer_model(0), nmspmm.BitmapConfig(0.5), sparsity=0.5), TypeError,
         r"sparsity: part of the config when one is given"),
    ],
)
def test_bitmap_config_rejects_bad_fields(make, error, match):
    with pytest.raises(error, match=match):
        make()


def _correlated_inputs(count: int, tokens: int, width: int, generator: torch.Generator) -> list[torch.Tensor]:
    mix = torch.randn(width, width, generator=generator) / width**0.5 + torch.eye(width)
    scale = torch.rand(width, generator=generator) * 2 + 0.1
    return [((torch.randn(tokens, width, generator=generator) @ mix) * scale).to(DEVICE) for _ in range(count)]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_method_keeps_csrs_entries_and_values(method):
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(_dense(64, 64), nn.GELU(), _dense(32, 64))
    calibration = None if method == "magnitude" else _correlated_inputs(4, 32, 64, generator)
    bitmap, csr = copy.deepcopy(model), copy.deepcopy(model)
    report = nmspmm.sparsify(bitmap, nmspmm.BitmapConfig(0.6, method), calibration=calibration)
    nmspmm.sparsify(csr, nmspmm.CSRConfig(0.6, method), calibration=calibration)
    assert report.method == method and report.swapped == ["0", "2"]
    for name in report.swapped:
        assert type(bitmap.get_submodule(name)) is nmspmm.BitmapLinear
        assert torch.equal(bitmap.get_submodule(name).to_dense(), csr.get_submodule(name).to_dense())
    x = torch.randn(5, 64, device=DEVICE)
    with torch.no_grad():
        assert relative_error(bitmap(x), csr(x).double()) < TOLERANCE[torch.float32]


def test_sparsegpt_settings_reach_the_reconstruction():
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = nn.Sequential(_dense(64, 64))
    calibration = _correlated_inputs(4, 32, 64, generator)
    gram = nmspmm.prune.collect_input_grams(model, calibration)["0"]
    weight = model[0].weight.detach().clone()
    config = nmspmm.BitmapConfig(0.6, "sparsegpt", damping=0.05, columns=16)
    nmspmm.sparsify(model, config, calibration=calibration)
    expected = nmspmm.prune.sparsegpt_csr(weight, gram, 0.6, damping=0.05, columns=16).to_dense()
    assert type(model[0]) is nmspmm.BitmapLinear
    assert relative_error(model[0].to_dense().detach(), expected) < 1e-6
    reconstructed = config.reconstruct(weight, gram)
    assert isinstance(reconstructed, nmspmm.BitmapWeight) and torch.equal(reconstructed.to_dense(), expected)
    defaults = nmspmm.BitmapConfig(0.6, "sparsegpt")
    assert relative_error(defaults.reconstruct(weight, gram).to_dense(), expected) > 1e-3


def test_fine_tuning_updates_values_under_a_fixed_structure():
    model = _three_layer_model(4)
    nmspmm.sparsify(model, "bitmap", sparsity=0.8)
    first = model[0]
    structure = (first.bitmap.clone(), first.block_offsets.clone())
    before = first.values.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(16, 64, device=DEVICE)).square().mean().backward()
    optimizer.step()
    assert first.values.grad is not None and first.bias.grad is not None
    assert not torch.equal(first.values.detach(), before)
    assert torch.equal(first.bitmap, structure[0]) and torch.equal(first.block_offsets, structure[1])


# ---- densify, save_pretrained / load_pretrained, meta skeletons, compile ---------------------------------------


def _mixed_model(seed: int) -> nn.Module:
    """The three-layer model with bitmap layers and a CSR one."""
    model = _three_layer_model(seed)
    nmspmm.sparsify(model, "bitmap", sparsity=0.7, skip=lambda name, module: name == "3")
    nmspmm.sparsify(model, "csr", sparsity=0.5)
    return model


def test_densify_gives_nn_linear_layers_of_the_same_outputs():
    model = _mixed_model(0)
    x = torch.randn(5, 64, device=DEVICE)
    with torch.no_grad():
        expected = model(x)
    dense = {name: model.get_submodule(name).to_dense().detach().clone() for name in ("0", "2", "3")}
    assert nmspmm.densify(model) == ["0", "2", "3"]
    for name, weight in dense.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight.detach(), weight)
    with torch.no_grad():
        assert relative_error(model(x), expected) < TOLERANCE[torch.float32]
    assert nmspmm.densify(model) == []
    with pytest.raises(ValueError, match=r"model: is itself a sparse layer"):
        nmspmm.densify(_layer())


def test_save_pretrained_load_pretrained_round_trip(tmp_path):
    sparse = _mixed_model(0)
    path = tmp_path / "model.safetensors"
    nmspmm.save_pretrained(sparse, path)
    fresh = _three_layer_model(1)
    assert nmspmm.load_pretrained(fresh, path) is fresh
    assert [type(fresh.get_submodule(name)) for name in ("0", "2", "3")] == [
        nmspmm.BitmapLinear, nmspmm.BitmapLinear, nmspmm.CSRLinear
    ]
    x = torch.randn(5, 64, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(fresh(x), sparse(x))
    assert fresh[0].values.requires_grad and fresh[0].bitmap.dtype == torch.int32
    with safe_open(str(path), framework="pt") as file:
        header = json.loads(file.metadata()["nmspmm_model"])
        weights = json.loads(file.metadata()["nmspmm"])["weights"]
    assert header["modules"] == {"0": "BitmapLinear", "2": "BitmapLinear", "3": "CSRLinear"}
    assert weights["0"]["format"] == "BitmapWeight" and weights["3"]["format"] == "CSRWeight"
    half = _three_layer_model(2).half()  # each layer is rebuilt in its dense layer's dtype
    nmspmm.load_pretrained(half, path)
    assert half[0].values.dtype == torch.float16 and half[0].block_offsets.dtype == torch.int32
    with torch.no_grad():
        assert relative_error(half(x.half()), sparse(x)) < 10 * TOLERANCE[torch.float16]


def test_load_pretrained_refuses_a_tampered_bitmap(tmp_path):
    path = tmp_path / "model.safetensors"
    nmspmm.save_pretrained(_mixed_model(0), path)
    with safe_open(str(path), framework="pt") as file:
        metadata, tensors = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}
    corrupted = tmp_path / "corrupted.safetensors"
    bitmap = tensors["0.bitmap"]
    original = bitmap.clone()
    bitmap[0, 0] ^= 1  # one kept entry more or fewer than there are values
    save_file(tensors, str(corrupted), metadata=metadata)
    with pytest.raises(ValueError, match=r"weight '0' is inconsistent: values: expected nnz=\d+ entries \(the bits set "
                       r"in bitmap\), got \d+"):
        nmspmm.load_pretrained(_three_layer_model(1), corrupted)
    # Moving a kept entry to the input beside it keeps a valid structure: the checksum refuses it.
    row = int(((original[:, 0] & 1) != ((original[:, 0] >> 1) & 1)).nonzero()[0])
    bitmap.copy_(original)
    bitmap[row, 0] ^= 0b11
    save_file(tensors, str(corrupted), metadata=metadata)
    with pytest.raises(ValueError, match=r"0.bitmap: its bytes do not match the checksum saved with them"):
        nmspmm.load_pretrained(_three_layer_model(1), corrupted)


def test_meta_skeleton_loads_the_real_sparse_weights():
    real = _three_layer_model(0)
    report = nmspmm.sparsify(real, "bitmap", sparsity=0.7)
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 48), nn.Linear(48, 20))
        assert nmspmm.sparsify(skeleton, "bitmap", sparsity=0.7).swapped == report.swapped
    for name in report.swapped:
        module = skeleton.get_submodule(name)
        assert type(module) is nmspmm.BitmapLinear and module.values.is_meta and module.weight.shape_only
        assert module.values.shape == real.get_submodule(name).values.shape
    placeholder = copy.deepcopy(skeleton).to_empty(device=DEVICE)  # the placeholder structure: valid, in bounds
    nmspmm.BitmapWeight.from_state(placeholder[0].weight.state_tensors(), placeholder[0].weight.state_fields(),
                                   allow_nonfinite=True)
    skeleton.load_state_dict({key: tensor.clone() for key, tensor in real.state_dict().items()}, assign=True)
    x = torch.randn(5, 64, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(skeleton(x), real(x))


def test_compile_bitmap_model_fullgraph():
    model = _three_layer_model(3)
    nmspmm.sparsify(model, "bitmap", sparsity=0.8)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(5, 64, device=DEVICE)
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < TOLERANCE[torch.float32]
    compiled(x).square().sum().backward()
    grads = [model.get_submodule(name).values.grad.clone() for name in ("0", "2", "3")]
    model.zero_grad()
    model(x).square().sum().backward()
    for name, grad in zip(("0", "2", "3"), grads):
        assert relative_error(grad, model.get_submodule(name).values.grad) < TOLERANCE[torch.float32]
    torch._dynamo.reset()


# ---- nmspmm.linear and linear_feature_major dispatch ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_dispatches_a_bitmap_weight(backend):
    torch.manual_seed(7)
    weight = nmspmm.prune.prune_bitmap(torch.randn(21, 70, device=DEVICE), 0.6)
    bias = torch.randn(21, device=DEVICE)
    x = torch.randn(2, 3, 70, device=DEVICE)
    y = nmspmm.linear(x, weight, bias, backend=backend)
    assert torch.equal(y, bitmap_linear(x, weight, bias, backend=backend))
    expected = x.double() @ weight.to_dense().double().t() + bias.double()
    assert relative_error(y, expected) < TOLERANCE[torch.float32]
    x_t = x.reshape(-1, 70).t().contiguous()
    y_t = nmspmm.linear_feature_major(x_t, weight, bias, backend=backend)
    assert torch.equal(y_t, bitmap_linear_feature_major(x_t, weight, bias, backend=backend))
    assert relative_error(y_t.t(), expected.reshape(-1, 21)) < TOLERANCE[torch.float32]


def test_linear_dispatch_errors_list_the_bitmap_format():
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(TypeError, match=r"^weight: expected an nmspmm.NMSparseWeight, QuantizedNMWeight, CSRWeight, "
                       r"BitmapWeight or BlockShuffledWeight, got Tensor$"):
        nmspmm.linear(x, torch.randn(8, 16))
    with pytest.raises(TypeError, match=r"^weight: expected an nmspmm.NMSparseWeight, CSRWeight or BitmapWeight, "
                       r"got Tensor$"):
        nmspmm.linear_feature_major(x.t(), torch.randn(8, 16))
    block = nmspmm.prune.prune_block_shuffled(torch.randn(32, 32, device=DEVICE), 0.5, (16, 16), search=False)
    with pytest.raises(TypeError, match=r"takes an NMSparseWeight, CSRWeight or BitmapWeight; a BlockShuffledWeight"):
        nmspmm.linear_feature_major(torch.randn(32, 2, device=DEVICE), block)


def test_public_names():
    assert {"BitmapWeight", "BitmapLinear", "BitmapConfig"} <= set(nmspmm.__all__)
    assert nmspmm.BitmapWeight is nmspmm.formats.BitmapWeight
    assert nmspmm.BitmapLinear in nmspmm.nn.SPARSE_MODULES
    for name in ("bitmap_linear", "bitmap_linear_feature_major", "bitmap_linear_op", "bitmap_linear_feature_major_op"):
        assert name in nmspmm.ops.__all__ and callable(getattr(nmspmm.ops, name))
