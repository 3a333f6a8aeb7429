"""QuantizedNMWeight (vector-wise N:M with 8-bit kept values, float8_e4m3fn or int8, and one fp32 scale per output
feature): quantization, validation, persistence (torch.save and safetensors, tampered files included), products
(the Triton kernels' SCALED path, under the interpreter on the CPU, and the dense reference) against a float64
product with the dequantized weight, gradients, QuantizedSparseLinear and sparsify(weight_dtype=...),
torch.compile, opcheck, and the GPU-only cases (non-finite activations: tests/test_nonfinite.py, with every
format)."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import nmspmm
from conftest import DEVICE, TOLERANCE, relative_error, rewrite_zip_entry
from nmspmm import NMSparseWeight, QuantizedNMWeight, QuantizedSparseLinear
from nmspmm.formats.quantized import QUANTIZED_MAX
from nmspmm.ops import nm_quantized_linear_op

QDTYPES = [torch.float8_e4m3fn, torch.int8]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# On the CPU "triton" runs the kernels through the interpreter and "auto" is the dense reference; on a GPU "auto"
# is the kernels and "reference" the dense reference.
BACKENDS = ["auto", "triton"] if DEVICE == "cpu" else ["auto", "reference"]

# Relative Frobenius-norm error of a weight-only quantized product against the float64 product with the
# dequantized weight: the values are exact in every activation dtype, so only the accumulation and the output's
# rounding differ (fp32 activations: as exact as an fp32 product).
WEIGHT_ONLY_TOLERANCE = 1e-2
PRODUCT_TOLERANCE = {
    torch.float32: TOLERANCE[torch.float32],
    torch.float16: TOLERANCE[torch.float16],
    torch.bfloat16: WEIGHT_ONLY_TOLERANCE,
}
# Relative error of the dequantized weight against the unquantized one (randn weights): int8 rounds to 1/127 of a
# row's largest value, float8_e4m3fn keeps 3 mantissa bits.
QUANTIZATION_ERROR = {torch.int8: 1e-2, torch.float8_e4m3fn: 4e-2}


def _pruned(rows: int, cols: int, pattern: str, vector: int, dtype: torch.dtype = torch.float32) -> NMSparseWeight:
    return nmspmm.prune(torch.randn(rows, cols, device=DEVICE).to(dtype), pattern, vector)


def _quantized(
    rows: int, cols: int, pattern: str, vector: int, qdtype: torch.dtype, dtype: torch.dtype = torch.float32
) -> QuantizedNMWeight:
    return _pruned(rows, cols, pattern, vector, dtype).quantize(qdtype)


def _dequantized(weight: QuantizedNMWeight) -> torch.Tensor:
    """float64 ``[N, K]``: ``values * scales[:, None]`` at the kept positions (each row's kept values ascending,
    so row-major order of the mask), zeros elsewhere."""
    kept = weight.values.double() * weight.scales.double()[:, None]
    dense = torch.zeros(tuple(weight.shape), dtype=torch.float64, device=weight.device)
    return dense.masked_scatter_(weight.mask(), kept)


def _reference(x: torch.Tensor, weight: QuantizedNMWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 ``x @ W.T + bias`` with ``W`` the dequantized weight."""
    y = x.double() @ _dequantized(weight).t()
    return y + bias.double() if bias is not None else y


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (torch.equal has no float8 kernel on the CPU)."""
    return tensor.detach().contiguous().view(torch.uint8)


def assert_same(loaded: object, original: QuantizedNMWeight) -> None:
    assert type(loaded) is QuantizedNMWeight
    fields = ("pattern", "vector", "shape", "dtype", "values_dtype", "device")
    assert [getattr(loaded, f) for f in fields] == [getattr(original, f) for f in fields]
    assert torch.equal(_bits(loaded.values), _bits(original.values))
    assert torch.equal(loaded.offsets, original.offsets)
    assert torch.equal(loaded.scales, original.scales)
    assert torch.equal(loaded.to_dense(), original.to_dense())


# ---- quantization -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_quantization_error_per_dtype(qdtype):
    weight = _pruned(64, 96, "8:32", 16)
    quantized = weight.quantize(qdtype)
    assert type(quantized) is QuantizedNMWeight and isinstance(quantized, NMSparseWeight)
    assert quantized.dtype == torch.float32 and quantized.values_dtype == qdtype
    assert quantized.values.shape == weight.values.shape and quantized.scales.dtype == torch.float32
    dense = quantized.to_dense()
    assert dense.dtype == torch.float32 and dense.shape == (64, 96)
    error = relative_error(dense, weight.to_dense())
    assert 0 < error < QUANTIZATION_ERROR[qdtype]
    assert relative_error(dense, _dequantized(quantized)) < TOLERANCE[torch.float32]
    assert bool(((dense != 0) <= weight.mask()).all())  # nonzero only where kept


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_scales_are_each_rows_largest_kept_magnitude_over_the_dtypes_largest(qdtype):
    weight = _pruned(32, 64, "2:4", 1)
    quantized = weight.quantize(qdtype)
    largest = weight.values.abs().amax(dim=1)
    assert torch.equal(quantized.scales, largest / QUANTIZED_MAX[qdtype])
    # Each row's largest kept value lands on the dtype's largest magnitude.
    peak = torch.full((32,), QUANTIZED_MAX[qdtype], device=DEVICE)
    assert torch.equal(quantized.values.float().abs().amax(dim=1), peak)


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_rows_of_zeros_take_scale_one_and_zero_values(qdtype):
    dense = torch.randn(64, 96, device=DEVICE)
    dense[16:32] = 0.0  # one whole V-group
    dense[40] = 0.0  # one row of a V-group whose other rows are not zero
    quantized = nmspmm.prune(dense, "8:32", 16).quantize(qdtype)
    zero = torch.zeros(64, dtype=torch.bool, device=DEVICE)
    zero[16:32] = zero[40] = True
    assert torch.equal(quantized.scales[zero], torch.ones(17, device=DEVICE))
    assert bool((quantized.scales[~zero] != 1).all())
    assert not bool(quantized.values[zero].float().any())
    assert bool(quantized.values[~zero].float().abs().amax(dim=1).eq(QUANTIZED_MAX[qdtype]).all())
    assert not bool(quantized.to_dense()[zero].any())


def test_int8_values_are_symmetric_never_minus_128():
    dense = torch.randn(32, 64, device=DEVICE)
    dense[::2, 5] = -10.0  # these rows' largest magnitude is negative: it must land on -127
    quantized = nmspmm.prune(dense, "2:4", 1).quantize(torch.int8)
    assert int(quantized.values.min()) == -127 and int(quantized.values.max()) <= 127
    assert bool((quantized.values[::2].amin(dim=1) == -127).all())
    assert not bool((quantized.values == -128).any())


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("pattern,vector", [("8:32", 16), ("6:8", 1)])  # 6:8 stores the dropped positions
def test_nbytes(qdtype, pattern, vector):
    weight = _pruned(64, 96, pattern, vector, torch.bfloat16)
    quantized = weight.quantize(qdtype)
    expected = quantized.values.numel() + quantized.offsets.numel() + 4 * 64 + 40
    assert quantized.nbytes == expected
    assert quantized.nbytes < weight.nbytes


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_keeps_the_structure(qdtype, dtype):
    weight = _pruned(32, 96, "8:32", 16, dtype)
    quantized = weight.quantize(qdtype)
    plain = quantized.dequantize()
    assert type(plain) is NMSparseWeight
    assert (plain.pattern, plain.vector, plain.shape, plain.dtype) == ("8:32", 16, weight.shape, dtype)
    assert torch.equal(plain.offsets, weight.offsets) and torch.equal(plain.mask(), weight.mask())
    assert torch.equal(plain.to_dense(), quantized.to_dense())
    assert relative_error(plain.to_dense(), _dequantized(quantized)) < TOLERANCE[dtype]


def test_quantizing_twice_and_from_dense_are_refused():
    weight = _pruned(32, 64, "2:4", 16)
    quantized = weight.quantize(torch.int8)
    with pytest.raises(TypeError, match=r"quantize: this weight is already quantized to torch.int8"):
        quantized.quantize(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"QuantizedNMWeight.from_dense: build the NMSparseWeight first"):
        QuantizedNMWeight.from_dense(weight.to_dense(), weight.mask(), "2:4", 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.uint8])
def test_unsupported_quantized_dtype_is_refused(dtype):
    with pytest.raises(TypeError, match=rf"^dtype: expected torch.float8_e4m3fn or torch.int8, got {dtype}"):
        _pruned(32, 64, "2:4", 16).quantize(dtype)


# ---- validation ---------------------------------------------------------------------------------------------


def _args(weight: QuantizedNMWeight, **changes: object) -> dict[str, object]:
    args = {
        "values": weight.values, "offsets": weight.offsets, "scales": weight.scales, "pattern": weight.pattern,
        "vector": weight.vector, "shape": weight.shape, "dtype": weight.dtype,
    }
    return {**args, **changes}


def _with_scale(weight: QuantizedNMWeight, value: float) -> torch.Tensor:
    scales = weight.scales.clone()
    scales[3] = value
    return scales


def _minus_128(weight: QuantizedNMWeight) -> torch.Tensor:
    values = weight.values.clone()
    values[2, 1] = -128
    return values


def _fp8_nan(weight: QuantizedNMWeight) -> torch.Tensor:
    values = weight.values.clone().view(torch.uint8)
    values[1, 1] = 0x7F  # float8_e4m3fn's NaN
    return values.view(torch.float8_e4m3fn)


@pytest.mark.parametrize(
    "qdtype,change,error,message",
    [
        (torch.int8, lambda w: {"scales": w.scales.double()}, TypeError, r"scales: expected a float32 tensor"),
        (torch.int8, lambda w: {"scales": w.scales.half()}, TypeError, r"scales: expected a float32 tensor"),
        (torch.int8, lambda w: {"scales": w.scales[:-1].clone()}, ValueError,
         r"scales: expected shape \(32,\), one per output feature, got \(31,\)"),
        (torch.int8, lambda w: {"scales": w.scales[None].clone()}, ValueError, r"scales: expected shape \(32,\)"),
        (torch.int8, lambda w: {"scales": _with_scale(w, 0.0)}, ValueError, r"scales: expected finite, positive"),
        (torch.float8_e4m3fn, lambda w: {"scales": _with_scale(w, -0.5)}, ValueError,
         r"scales: expected finite, positive"),
        (torch.int8, lambda w: {"scales": _with_scale(w, float("nan"))}, ValueError,
         r"scales: expected finite, positive"),
        (torch.float8_e4m3fn, lambda w: {"scales": _with_scale(w, float("inf"))}, ValueError,
         r"scales: expected finite, positive"),
        (torch.int8, lambda w: {"values": w.values.float()}, TypeError,
         r"values: expected a float8_e4m3fn or int8 tensor, got torch.float32"),
        (torch.float8_e4m3fn, lambda w: {"values": w.values.to(torch.bfloat16)}, TypeError,
         r"values: expected a float8_e4m3fn or int8 tensor, got torch.bfloat16"),
        (torch.int8, lambda w: {"values": _minus_128(w)}, ValueError,
         r"values: int8 values must lie in \[-127, 127\] \(symmetric\), found -128"),
        (torch.float8_e4m3fn, lambda w: {"values": _fp8_nan(w)}, ValueError, r"values: expected finite values"),
        (torch.int8, lambda w: {"values": w.values[:, :-1].clone()}, ValueError, r"values: expected shape"),
        (torch.int8, lambda w: {"dtype": torch.float64}, TypeError,
         r"dtype: expected float16, bfloat16 or float32 for the products"),
    ],
)
def test_constructor_refuses_inconsistent_tensors(qdtype, change, error, message):
    weight = _quantized(32, 96, "8:32", 16, qdtype)
    QuantizedNMWeight(**_args(weight))  # the unchanged tensors are accepted
    with pytest.raises(error, match=rf"^{message}"):
        QuantizedNMWeight(**_args(weight, **change(weight)))


@pytest.mark.parametrize(
    "qdtype,fields,message",
    [
        (torch.int8, {"values_dtype": "float8_e4m3fn"},
         r"values_dtype: metadata says 'float8_e4m3fn', but the stored values are torch.int8"),
        (torch.float8_e4m3fn, {"values_dtype": "int8"}, r"values_dtype: metadata says 'int8'"),
        (torch.int8, {"values_dtype": "float16"}, r"values_dtype: metadata says 'float16'"),
        (torch.int8, {"dtype": "int8"}, r"dtype: expected 'float16', 'bfloat16' or 'float32', got 'int8'"),
    ],
)
def test_from_state_refuses_mismatched_metadata(qdtype, fields, message):
    weight = _quantized(32, 96, "8:32", 16, qdtype)
    assert_same(QuantizedNMWeight.from_state(weight.state_tensors(), weight.state_fields()), weight)
    with pytest.raises(ValueError, match=rf"^{message}"):
        QuantizedNMWeight.from_state(weight.state_tensors(), {**weight.state_fields(), **fields})


def test_to_sets_the_products_dtype_and_keeps_the_values():
    weight = _quantized(32, 96, "8:32", 16, torch.float8_e4m3fn)
    half = weight.to(torch.bfloat16)
    assert (half.dtype, half.values_dtype, half.scales.dtype) == (torch.bfloat16, torch.float8_e4m3fn, torch.float32)
    assert torch.equal(_bits(half.values), _bits(weight.values)) and torch.equal(half.scales, weight.scales)
    assert half.to_dense().dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"^dtype: expected float16, bfloat16 or float32 for the products"):
        weight.to(torch.float64)


# ---- persistence --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_torch_save_load_round_trip(tmp_path: Path, qdtype):
    weight = _quantized(32, 96, "8:32", 16, qdtype, torch.bfloat16)
    torch.save({"w": weight}, tmp_path / "w.pt")
    assert_same(torch.load(tmp_path / "w.pt")["w"], weight)  # weights_only, the default


def test_torch_load_refuses_changed_scales(tmp_path: Path):
    weight = _quantized(32, 96, "8:32", 16, torch.int8)
    path = tmp_path / "w.pt"
    torch.save(weight, path)
    changed = weight.scales.clone()
    changed[5] *= 2  # still a valid scale: only the checksum can tell
    rewrite_zip_entry(path, weight.scales.cpu().numpy().tobytes(), changed.cpu().numpy().tobytes())
    with pytest.raises(ValueError, match=r"scales: its bytes do not match the checksum"):
        torch.load(path)


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_safetensors_round_trip(tmp_path: Path, qdtype):
    weights = {"a": _quantized(32, 96, "8:32", 16, qdtype, torch.float16), "b": _pruned(32, 64, "2:4", 1)}
    nmspmm.save_safetensors(weights, tmp_path / "w.safetensors")
    loaded = nmspmm.load_safetensors(tmp_path / "w.safetensors", device=DEVICE)
    assert list(loaded) == ["a", "b"]
    assert_same(loaded["a"], weights["a"])
    assert type(loaded["b"]) is NMSparseWeight and torch.equal(loaded["b"].to_dense(), weights["b"].to_dense())
    with safe_open(tmp_path / "w.safetensors", framework="pt") as file:
        assert sorted(file.keys()) == ["a.offsets", "a.scales", "a.values", "b.offsets", "b.values"]
        assert file.get_tensor("a.values").dtype == qdtype


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    nmspmm.save_safetensors(_quantized(32, 96, "8:32", 16, torch.int8), path)
    return path


@pytest.mark.parametrize(
    "factor,message",
    [(2.0, r"scales: its bytes do not match the checksum"), (-1.0, r"scales: expected finite, positive")],
)
def test_load_safetensors_refuses_changed_scale_bytes(saved: Path, factor, message):
    data = bytearray(saved.read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    start, _ = json.loads(data[8 : 8 + header_size])["weight.scales"]["data_offsets"]
    at = 8 + header_size + start
    (scale,) = struct.unpack("<f", data[at : at + 4])
    data[at : at + 4] = struct.pack("<f", scale * factor)
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=message):
        nmspmm.load_safetensors(saved)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("dtype", "float16", r"fields: .* do not match the checksum saved with them"),
        ("dtype", "float64", r"dtype: expected 'float16', 'bfloat16' or 'float32', got 'float64'"),
        ("values_dtype", "float8_e4m3fn", r"values_dtype: metadata says 'float8_e4m3fn', but the stored values are"),
    ],
)
def test_load_safetensors_refuses_edited_metadata(saved: Path, field, value, message):
    with safe_open(saved, framework="pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
        header = json.loads(file.metadata()["nmspmm"])
    header["weights"]["weight"][field] = value
    save_file(tensors, saved, metadata={"nmspmm": json.dumps(header)})
    with pytest.raises(ValueError, match=message):
        nmspmm.load_safetensors(saved)


# ---- products -----------------------------------------------------------------------------------------------

# (rows, cols, pattern, vector): K not a power of two where the pattern allows; V=64 needs N a multiple of 64.
PRODUCT_CASES = [
    (32, 24, "2:4", 1),
    (32, 24, "2:4", 16),
    (32, 96, "8:32", 1),
    (32, 96, "8:32", 16),
    (64, 96, "8:32", 64),
    (32, 40, "3:8", 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("rows,cols,pattern,vector", PRODUCT_CASES)
def test_linear_matches_the_dequantized_reference(rows, cols, pattern, vector, qdtype, dtype):
    weight = _quantized(rows, cols, pattern, vector, qdtype, dtype)
    bias = torch.randn(rows, device=DEVICE).to(dtype)
    # Each token count once with and once without bias, across the two quantized dtypes.
    for index, tokens in enumerate([0, 1, 7, 33]):
        with_bias = (index + QDTYPES.index(qdtype)) % 2 == 0
        b = bias if with_bias else None
        x = torch.randn(tokens, cols, device=DEVICE).to(dtype)
        expected = _reference(x, weight, b)
        for backend in BACKENDS:
            y = nmspmm.linear(x, weight, b, backend=backend)
            assert y.shape == (tokens, rows) and y.dtype == dtype and y.is_contiguous(), (backend, tokens)
            assert relative_error(y, expected) < PRODUCT_TOLERANCE[dtype], (backend, tokens, with_bias)


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("vector", [1, 16])
def test_linear_of_3d_input(vector, qdtype):
    weight = _quantized(32, 96, "8:32", vector, qdtype, torch.bfloat16)
    bias = torch.randn(32, device=DEVICE).to(torch.bfloat16)
    x = torch.randn(2, 3, 96, device=DEVICE).to(torch.bfloat16)
    expected = _reference(x, weight, bias)
    for backend in BACKENDS:
        y = nmspmm.linear(x, weight, bias, backend=backend)
        assert y.shape == (2, 3, 32) and y.dtype == torch.bfloat16 and y.is_contiguous()
        assert relative_error(y, expected) < PRODUCT_TOLERANCE[torch.bfloat16]
        functional = nmspmm.ops.nm_quantized_linear(x, weight, bias, backend=backend)
        assert torch.equal(functional, y)


def test_linear_refuses_operands_of_another_dtype():
    weight = _quantized(32, 96, "8:32", 16, torch.int8)  # products in float32
    with pytest.raises(TypeError, match=r"^x: dtype torch.bfloat16 does not match weight dtype torch.float32"):
        nmspmm.linear(torch.randn(3, 96, device=DEVICE).bfloat16(), weight)
    with pytest.raises(TypeError, match=r"^bias: dtype torch.float16 does not match weight dtype torch.float32"):
        nmspmm.linear(torch.randn(3, 96, device=DEVICE), weight, torch.randn(32, device=DEVICE).half())
    with pytest.raises(ValueError, match=r"^x: expected last dimension K=96"):
        nmspmm.linear(torch.randn(3, 64, device=DEVICE), weight)
    with pytest.raises(TypeError, match=r"^weight: expected an nmspmm.QuantizedNMWeight, got NMSparseWeight"):
        nmspmm.ops.nm_quantized_linear(torch.randn(3, 96, device=DEVICE), weight.dequantize())
    with pytest.raises(TypeError, match=r"^weight: linear_feature_major takes unquantized weights"):
        nmspmm.linear_feature_major(torch.randn(96, 3, device=DEVICE), weight)


# ---- gradients ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qdtype,vector,dtype", [
    (torch.int8, 1, torch.float32), (torch.float8_e4m3fn, 16, torch.float32), (torch.int8, 16, torch.bfloat16),
])
def test_gradients_of_x_and_bias(qdtype, vector, dtype, backend):
    weight = _quantized(32, 96, "8:32", vector, qdtype, dtype)
    x = torch.randn(2, 7, 96, device=DEVICE).to(dtype).requires_grad_()
    bias = torch.randn(32, device=DEVICE).to(dtype).requires_grad_()
    y = nmspmm.linear(x, weight, bias, backend=backend)
    assert relative_error(y.detach(), _reference(x.detach(), weight, bias.detach())) < PRODUCT_TOLERANCE[dtype]
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert x.grad.shape == x.shape and x.grad.dtype == dtype
    assert relative_error(x.grad, grad_y.double() @ _dequantized(weight)) < PRODUCT_TOLERANCE[dtype]
    assert relative_error(bias.grad, grad_y.double().sum((0, 1))) < PRODUCT_TOLERANCE[dtype]
    assert not weight.values.requires_grad and weight.values.grad is None and weight.scales.grad is None


def test_values_or_scales_that_require_grad_are_refused():
    weight = _quantized(32, 96, "8:32", 16, torch.float8_e4m3fn)
    x = torch.randn(3, 96, device=DEVICE)
    values = weight.values.clone().requires_grad_()
    trained = QuantizedNMWeight(**_args(weight, values=values))
    with pytest.raises(ValueError, match=r"^weight: its values or scales require grad"):
        nmspmm.linear(x, trained)
    scales = weight.scales.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"^weight: its values or scales require grad"):
        nmspmm.linear(x, QuantizedNMWeight(**_args(weight, scales=scales)))


# ---- QuantizedSparseLinear and sparsify ---------------------------------------------------------------------


def _linear(rows: int, cols: int, bias: bool = True) -> nn.Linear:
    return nn.Linear(cols, rows, bias=bias, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_from_dense_matches_the_functional_product(backend):
    dense = _linear(32, 96)
    module = QuantizedSparseLinear.from_dense(dense, "8:32", 16, torch.int8, backend=backend)
    expected_weight = nmspmm.prune(dense.weight.detach(), "8:32", 16).quantize(torch.int8)
    weight = module.weight
    assert type(weight) is QuantizedNMWeight and weight.values_dtype == torch.int8
    assert torch.equal(weight.values, expected_weight.values) and torch.equal(weight.scales, expected_weight.scales)
    assert [name for name, _ in module.named_parameters()] == ["bias"]
    assert not module.values.requires_grad
    x = torch.randn(7, 96, device=DEVICE)
    y = module(x)
    assert torch.equal(y, nmspmm.linear(x, weight, module.bias, backend=backend))
    assert relative_error(y.detach(), _reference(x, weight, module.bias.detach())) < TOLERANCE[torch.float32]
    assert torch.equal(module.to_dense(), weight.to_dense())


def _mlp() -> nn.Module:
    return nn.Sequential(_linear(64, 96), nn.GELU(), _linear(32, 64, bias=False))


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_sparsify_with_weight_dtype_matches_the_densified_model(qdtype):
    torch.manual_seed(0)
    model = _mlp()
    report = nmspmm.sparsify(model, "8:32", vector=16, weight_dtype=qdtype)
    assert report.swapped == ["0", "2"]
    for index in (0, 2):
        assert type(model[index]) is QuantizedSparseLinear and model[index].values.dtype == qdtype
    dense = copy.deepcopy(model)
    assert nmspmm.densify(dense) == ["0", "2"]
    for index in (0, 2):
        assert type(dense[index]) is nn.Linear
        assert relative_error(dense[index].weight.detach(), _dequantized(model[index].weight)) < 1e-7
    x = torch.randn(2, 5, 96, device=DEVICE)
    with torch.no_grad():
        assert relative_error(model(x), dense(x)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("cast,dtype", [
    (lambda module: module.half(), torch.float16), (lambda module: module.to(torch.bfloat16), torch.bfloat16),
])
def test_module_float_cast_sets_the_products_dtype(cast, dtype):
    module = QuantizedSparseLinear.from_dense(_linear(32, 96), "8:32", 16, torch.float8_e4m3fn)
    values, scales = module.values.clone(), module.scales.clone()
    assert cast(module) is module
    assert module.dtype == dtype and module.bias.dtype == dtype and module.weight.dtype == dtype
    assert module.values.dtype == torch.float8_e4m3fn and module.scales.dtype == torch.float32
    assert torch.equal(_bits(module.values), _bits(values)) and torch.equal(module.scales, scales)
    x = torch.randn(5, 96, device=DEVICE).to(dtype)
    with torch.no_grad():
        y = module(x)
    assert y.dtype == dtype
    assert relative_error(y, _reference(x, module.weight, module.bias.detach())) < PRODUCT_TOLERANCE[dtype]
    module.float()
    assert module.dtype == torch.float32 and module.values.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_given_new_scales_or_offsets_computes_with_them(backend):
    """A stored tensor given anew (not copied into) reaches the next product: no kept view or plan of the old one."""
    torch.manual_seed(0)
    module = QuantizedSparseLinear.from_dense(nn.Linear(64, 32).to(DEVICE), "2:4", 16, torch.int8, backend=backend)
    x = torch.randn(5, 64, device=DEVICE)

    def check() -> None:
        with torch.no_grad():
            expected = x.double() @ _dequantized(module.weight).t() + module.bias.double()
            assert relative_error(module(x), expected) < PRODUCT_TOLERANCE[torch.float32]

    check()
    module.scales = module.scales * 2
    check()
    other = _quantized(32, 64, "2:4", 16, torch.int8)
    module.offsets = other.offsets.clone()
    check()
    assert torch.equal(module.weight.mask(), other.mask())


def test_module_state_dict_round_trip():
    source = QuantizedSparseLinear.from_dense(_linear(32, 96), "8:32", 16, torch.int8)
    target = QuantizedSparseLinear.from_dense(_linear(32, 96), "8:32", 16, torch.int8)
    state = source.state_dict()
    assert set(state) == {"values", "offsets", "scales", "bias"}
    assert state["values"].dtype == torch.int8 and state["scales"].dtype == torch.float32
    target.load_state_dict(state)
    for name in ("values", "offsets", "scales", "kept_offsets"):
        assert torch.equal(getattr(target, name), getattr(source, name)), name
    x = torch.randn(4, 96, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_load_state_dict_refuses_bad_scales():
    module = QuantizedSparseLinear.from_dense(_linear(32, 96), "8:32", 16, torch.int8)
    before = module.scales.clone()
    state = {key: value.clone() for key, value in module.state_dict().items()}
    state["scales"][4] = -state["scales"][4]
    with pytest.raises(ValueError, match=r"^state_dict: values, offsets and scales are not a 8:32 weight.*scales: "):
        module.load_state_dict(state)
    assert torch.equal(module.scales, before)


def test_save_pretrained_round_trip(tmp_path: Path):
    torch.manual_seed(0)
    model = _mlp()
    nmspmm.sparsify(model, "8:32", vector=16, weight_dtype=torch.int8)
    path = tmp_path / "model.safetensors"
    nmspmm.save_pretrained(model, path)
    torch.manual_seed(1)
    fresh = _mlp()
    assert nmspmm.load_pretrained(fresh, path) is fresh
    for index in (0, 2):
        layer, source = fresh[index], model[index]
        assert type(layer) is QuantizedSparseLinear and layer.values.dtype == torch.int8
        assert torch.equal(layer.values, source.values) and torch.equal(layer.scales, source.scales)
    x = torch.randn(3, 96, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_weight_dtype_refusals():
    with pytest.raises(ValueError, match=r"^weight_dtype: quantized values are for n:m patterns"):
        nmspmm.sparsify(_mlp(), "csr", sparsity=0.5, weight_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"^weight_dtype: quantized values are for n:m patterns"):
        nmspmm.sparsify(_mlp(), "block", sparsity=0.5, weight_dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"^weight_dtype: expected torch.float8_e4m3fn or torch.int8"):
        nmspmm.NMConfig("8:32", 16, weight_dtype=torch.float16)
    with pytest.raises(TypeError, match=r"^weight_dtype: part of the config when one is given"):
        nmspmm.sparsify(_mlp(), nmspmm.NMConfig("8:32", 16), weight_dtype=torch.int8)
    with pytest.raises(TypeError, match=r"^weight: a QuantizedNMWeight goes in a QuantizedSparseLinear"):
        nmspmm.SparseLinear(_quantized(32, 96, "8:32", 16, torch.int8))


def test_sparsify_on_the_meta_device_gives_shape_only_quantized_layers():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 32, bias=False))
    report = nmspmm.sparsify(model, "8:32", vector=16, weight_dtype=torch.float8_e4m3fn)
    assert report.swapped == ["0", "2"]
    for index, (rows, cols) in ((0, (64, 96)), (2, (32, 64))):
        layer = model[index]
        assert type(layer) is QuantizedSparseLinear and layer.weight.shape_only
        assert layer.values.is_meta and layer.values.shape == (rows, cols // 4)
        assert layer.values.dtype == torch.float8_e4m3fn
        assert layer.scales.is_meta and layer.scales.shape == (rows,) and layer.scales.dtype == torch.float32
        assert layer.offsets.shape == (rows // 16, cols // 32, 8) and layer.offsets.dtype == torch.uint8
        assert layer.dtype == torch.float32
    assert model[0].bias.is_meta and model[0].bias.shape == (64,) and model[2].bias is None


# ---- torch.compile and opcheck ------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("backend,product", [("eager", "auto"), ("aot_eager", "auto"), ("aot_eager", BACKENDS[-1])])
def test_compile_fullgraph_matches_eager(backend, product):
    module = QuantizedSparseLinear.from_dense(_linear(32, 96), "8:32", 16, torch.float8_e4m3fn, backend=product).eval()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    with torch.no_grad():
        for shape in [(5, 96), (2, 7, 96)]:
            x = torch.randn(shape, device=DEVICE)
            y = compiled(x)
            assert y.shape == (*shape[:-1], 32)
            assert relative_error(y, module(x)) < TOLERANCE[torch.float32]
            assert relative_error(y, _reference(x, module.weight, module.bias.detach())) < TOLERANCE[torch.float32]


def _opcheck_samples() -> list[object]:
    samples = []
    backends = ["reference", "triton"] if DEVICE == "cpu" else ["auto", "reference"]
    for qdtype, pattern, vector, tokens, with_bias in [
        (torch.int8, "2:4", 16, 3, True), (torch.int8, "3:8", 1, 1, False), (torch.float8_e4m3fn, "3:8", 1, 2, True),
    ]:
        weight = _quantized(32, 64, pattern, vector, qdtype)
        bias = torch.randn(32, device=DEVICE, requires_grad=True) if with_bias else None
        x = torch.randn(tokens, 64, device=DEVICE, requires_grad=True)
        for backend in backends:
            args = (x, weight.values, weight.kept_offsets(), weight.scales, bias, weight.n, weight.m, vector, backend)
            samples.append(pytest.param(args, id=f"{str(qdtype).removeprefix('torch.')}-{pattern}-V{vector}-M{tokens}-"
                                                 f"{'bias' if with_bias else 'nobias'}-{backend}"))
    return samples


# opcheck's test_schema compares every argument before and after the call with torch.allclose, which torch
# does not implement for float8 tensors: float8 values get the other checks.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
OPCHECK_FLOAT8_UTILS = OPCHECK_UTILS[1:]


@pytest.mark.parametrize("args", _opcheck_samples())
def test_opcheck(args):
    utils = OPCHECK_FLOAT8_UTILS if args[1].dtype == torch.float8_e4m3fn else OPCHECK_UTILS
    torch.library.opcheck(torch.ops.nmspmm.nm_quantized_linear.default, args, test_utils=utils)


def test_op_schema():
    assert nm_quantized_linear_op._opoverload is torch.ops.nmspmm.nm_quantized_linear.default
    schema = str(torch.ops.nmspmm.nm_quantized_linear.default._schema)
    assert schema == (
        "nmspmm::nm_quantized_linear(Tensor x, Tensor values, Tensor kept_offsets, Tensor scales, Tensor? bias, "
        "int n, int m, int vector, str backend, Tensor? kept_bits=None) -> Tensor"
    )


# ---- GPU only -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("vector", [1, 64])
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_gpu_bf16_products(tokens, vector, qdtype):
    weight = _quantized(256, 512, "8:32", vector, qdtype, torch.bfloat16)
    x = torch.randn(tokens, 512, device=DEVICE).to(torch.bfloat16)
    bias = torch.randn(256, device=DEVICE).to(torch.bfloat16)
    y = nmspmm.linear(x, weight, bias)
    assert y.shape == (tokens, 256) and y.dtype == torch.bfloat16 and y.is_contiguous()
    assert relative_error(y, _reference(x, weight, bias)) < WEIGHT_ONLY_TOLERANCE


@pytest.mark.gpu
@pytest.mark.parametrize("qdtype", QDTYPES)
def test_gpu_cuda_graph_capture_and_replay(qdtype):
    torch.manual_seed(0)
    model = _mlp().half()
    nmspmm.sparsify(model, "8:32", vector=16, weight_dtype=qdtype)
    model.eval()
    x_static = torch.randn(48, 96, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles off the capture
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
            assert torch.equal(y_static, model(x_new))
