"""Unstructured sparsity: CSRWeight (round trips, derived structures, validation, saving), magnitude pruning,
the Triton SpMM and SDDMM against float64 references (outputs poisoned first), csr_linear and sddmm through the
ops, their gradients, torch.compile and opcheck, and every bad-input error."""

from __future__ import annotations

import importlib
import io

import pytest
import torch

from conftest import DEVICE, TOLERANCE, relative_error
from nmspmm.formats.csr import CSRWeight, tile_offsets_of
from nmspmm.kernels.csr_spmm import csr_spmm
from nmspmm.kernels.sddmm import sddmm as sddmm_kernel
from nmspmm.kernels.sddmm import CELL, SddmmTile, sddmm_tiled
from nmspmm.ops.csr import (
    csr_linear,
    csr_linear_feature_major,
    csr_linear_feature_major_op,
    csr_linear_grad_input_op,
    csr_linear_op,
    csr_sddmm_op,
    sddmm,
)
from nmspmm.prune.unstructured import prune_csr, unstructured_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# On the CPU "triton" runs the kernels through the interpreter; "auto" there is the dense reference.
BACKENDS = ["auto", "triton"] if DEVICE == "cpu" else ["auto"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _mask(rows: int, cols: int, density: float = 0.2) -> torch.Tensor:
    """A random mask with empty rows (every fifth) and one full row (several chunks of nonzeros)."""
    mask = torch.rand(rows, cols, device=DEVICE) < density
    mask[::5] = False
    mask[min(1, rows - 1)] = True
    return mask


def _weight(rows: int, cols: int, dtype: torch.dtype = torch.float32, density: float = 0.2) -> CSRWeight:
    return CSRWeight.from_dense(torch.randn(rows, cols, device=DEVICE).to(dtype), _mask(rows, cols, density))


def _reference(x: torch.Tensor, weight: CSRWeight, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ weight.to_dense().double().t()
    return y + bias.double() if bias is not None else y


# ---------------------------------------------------------------------------------------------------------
# The format
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip(dtype):
    dense = torch.randn(45, 70, device=DEVICE).to(dtype)
    mask = _mask(45, 70)
    weight = CSRWeight.from_dense(dense, mask)
    assert weight.shape == (45, 70) and weight.dtype == dtype and weight.nnz == int(mask.sum())
    assert weight.col_indices.dtype == weight.row_offsets.dtype == torch.int32
    assert torch.equal(weight.mask(), mask)
    assert torch.equal(weight.to_dense(), torch.where(mask, dense, torch.zeros((), dtype=dtype, device=DEVICE)))
    assert torch.equal(weight.values, dense[mask])
    assert torch.equal(weight.row_offsets.diff(), mask.sum(1).int())
    assert weight.sparsity == pytest.approx(1 - weight.nnz / (45 * 70))
    assert weight.nbytes == weight.nnz * (dense.element_size() + 4) + 46 * 4 + 16
    # Integer 0/1 masks and non-contiguous weights compress the same.
    transposed = CSRWeight.from_dense(dense.t().contiguous().t(), mask.to(torch.uint8))
    assert torch.equal(transposed.values, weight.values) and torch.equal(transposed.col_indices, weight.col_indices)


def test_derived_structures():
    weight = _weight(45, 70)
    lengths = weight.row_offsets.diff()
    order = weight.row_order()
    assert order.dtype == torch.int32 and sorted(order.tolist()) == list(range(45))
    assert bool((lengths[order.long()].diff() <= 0).all())
    ties = lengths[order.long()][1:] == lengths[order.long()][:-1]
    assert bool((order[1:][ties] > order[:-1][ties]).all())  # stable: equal lengths keep row order
    rows = weight.row_indices()
    assert torch.equal(rows.long(), weight.mask().nonzero()[:, 0])

    transposed = weight.transposed_structure()
    expected = CSRWeight.from_dense(weight.to_dense().t(), weight.mask().t())
    assert torch.equal(transposed.row_offsets, expected.row_offsets)
    assert torch.equal(transposed.col_indices, expected.col_indices)
    assert torch.equal(weight.values[transposed.permutation.long()], expected.values)
    assert torch.equal(transposed.row_order, expected.row_order())
    assert weight.transposed_structure() is transposed and weight.row_order() is order  # cached

    twin = weight._with_values(torch.ones_like(weight.values))
    assert twin.row_order() is order and twin.col_indices is weight.col_indices


def test_empty_and_full_matrices():
    empty = CSRWeight.from_dense(torch.randn(6, 9, device=DEVICE), torch.zeros(6, 9, dtype=torch.bool, device=DEVICE))
    assert empty.nnz == 0 and empty.sparsity == 1.0
    assert torch.equal(empty.to_dense(), torch.zeros(6, 9, device=DEVICE))
    assert empty.transposed_structure().row_offsets.tolist() == [0] * 10
    full = CSRWeight.from_dense(torch.randn(6, 9, device=DEVICE), torch.ones(6, 9, dtype=torch.bool, device=DEVICE))
    assert full.nnz == 54 and full.col_indices.tolist() == list(range(9)) * 6


def test_to_cpu_and_repr():
    weight = _weight(12, 20)
    half = weight.to(torch.float16)
    assert half.dtype == torch.float16 and half.col_indices.dtype == torch.int32
    assert torch.equal(half.to_dense(), weight.to_dense().half())
    assert weight.cpu().device.type == "cpu"
    assert repr(weight).startswith(f"CSRWeight(shape=(12, 20), nnz={weight.nnz}, sparsity=")


def _field_cases() -> list[object]:
    """pytest params of (change to (values, col_indices, row_offsets, shape), error, message)."""

    def swap_in_row(v, c, o, s):
        c = c.clone()
        c[[1, 2]] = c[[2, 1]]  # row 1 is full, so positions 1 and 2 are in one row
        return v, c, o, s

    def repeat_in_row(v, c, o, s):
        c = c.clone()
        c[2] = c[1]
        return v, c, o, s

    def decreasing(v, c, o, s):
        o = o.clone()
        o[3] = o[4] + 1
        return v, c, o, s

    def column(value):
        def change(v, c, o, s):
            c = c.clone()
            c[5] = value
            return v, c, o, s

        return change

    cases = [
        (lambda v, c, o, s: (v.double(), c, o, s), TypeError, r"values: expected a float16, .*got torch.float64"),
        (lambda v, c, o, s: (v.tolist(), c, o, s), TypeError, r"values: expected a float16, .*got list"),
        (lambda v, c, o, s: (v.view(1, -1), c, o, s), ValueError, r"values: expected a 1-D \[nnz\] tensor"),
        (lambda v, c, o, s: (v, c.long(), o, s), TypeError, r"col_indices: expected an int32 tensor, got torch.int64"),
        (lambda v, c, o, s: (v, c[:-1], o, s), ValueError, r"col_indices: expected shape \(\d+,\), got"),
        (lambda v, c, o, s: (v, c, o.long(), s), TypeError, r"row_offsets: expected an int32 tensor"),
        (lambda v, c, o, s: (v, c, o[:-1], s), ValueError, r"row_offsets: expected shape \(13,\), got \(12,\)"),
        (lambda v, c, o, s: (v, c.to("meta"), o, s), ValueError, r"col_indices: on meta, but values are on"),
        (lambda v, c, o, s: (v, c, o.to("meta"), s), ValueError, r"row_offsets: on meta, but values are on"),
        (lambda v, c, o, s: (v, c, o + 1, s), ValueError, r"row_offsets: expected to start at 0 and end at nnz"),
        (lambda v, c, o, s: (v[:-1], c[:-1], o, s), ValueError, r"row_offsets: .*end at nnz=\d+ .*got 0 and \d+"),
        (decreasing, ValueError, r"row_offsets: must be non-decreasing, but row_offsets\[4\]=\d+ < row_offsets\[3\]"),
        (column(20), ValueError, r"col_indices: expected values in \[0, K=20\), got 20 at position 5"),
        (column(-1), ValueError, r"col_indices: expected values in \[0, K=20\), got -1 at position 5"),
        (swap_in_row, ValueError, r"col_indices: must be strictly ascending within each row, but row 1 has column 1"),
        (repeat_in_row, ValueError, r"col_indices: must be strictly ascending .*row 1 has column 1 after 1"),
        (lambda v, c, o, s: (v, c, o, (12,)), ValueError, r"shape: expected \(N, K\) with N, K > 0, got \(12,\)"),
        (lambda v, c, o, s: (v, c, o, (0, 20)), ValueError, r"shape: expected \(N, K\) with N, K > 0"),
        (lambda v, c, o, s: (v, c, o, ("12", 20)), TypeError, r"shape: expected \(N, K\) as two ints"),
    ]  # fmt: skip
    return [pytest.param(*case, id=f"{i}-{case[2][:30]}") for i, case in enumerate(cases)]


@pytest.mark.parametrize("change,error,message", _field_cases())
def test_constructor_rejects_bad_fields(change, error, message):
    weight = _weight(12, 20)
    fields = change(weight.values, weight.col_indices, weight.row_offsets, weight.shape)
    with pytest.raises(error, match=message):
        CSRWeight(*fields)


def test_from_dense_rejects_bad_input():
    dense = torch.randn(8, 10, device=DEVICE)
    mask = torch.rand(8, 10, device=DEVICE) < 0.5
    with pytest.raises(ValueError, match=r"mask: expected shape \(8, 10\) like weight, got \(8, 9\)"):
        CSRWeight.from_dense(dense, mask[:, :9])
    with pytest.raises(ValueError, match=r"mask: on meta, but weight is on"):
        CSRWeight.from_dense(dense, mask.to("meta"))
    with pytest.raises(TypeError, match=r"mask: expected a bool \(or 0/1 integer\) tensor, got torch.float32"):
        CSRWeight.from_dense(dense, mask.float())
    with pytest.raises(TypeError, match=r"mask: expected a bool \(or 0/1 integer\) tensor, got torch.int64"):
        CSRWeight.from_dense(dense, mask.long() * 2)
    with pytest.raises(TypeError, match=r"mask: expected a torch.Tensor, got list"):
        CSRWeight.from_dense(dense, mask.tolist())
    with pytest.raises(TypeError, match=r"weight: expected dtype float16, bfloat16 or float32, got torch.float64"):
        CSRWeight.from_dense(dense.double(), mask)
    with pytest.raises(ValueError, match=r"weight: expected a 2-D \[out_features, in_features\] matrix"):
        CSRWeight.from_dense(dense[0], mask[0])
    poisoned = dense.clone()
    poisoned[2, 3] = float("inf")
    mask[2, 3] = True
    with pytest.raises(ValueError, match=r"weight: kept entries must be finite, got inf at row 2, column 3"):
        CSRWeight.from_dense(poisoned, mask)
    mask[2, 3] = False
    assert CSRWeight.from_dense(poisoned, mask).nnz == int(mask.sum())  # pruned entries may be anything


# ---------------------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 0.9999])
def test_prune_sparsity_is_exact_and_keeps_largest(sparsity):
    dense = torch.randn(45, 70, device=DEVICE)
    weight = prune_csr(dense, sparsity)
    assert weight.nnz == round((1 - sparsity) * 45 * 70)
    kept = weight.mask()
    if 0 < weight.nnz < dense.numel():
        assert dense.abs()[kept].min() >= dense.abs()[~kept].max()
    assert torch.equal(weight.to_dense(), torch.where(kept, dense, torch.zeros((), device=DEVICE)))


def test_prune_ties_are_deterministic_and_detached():
    dense = torch.ones(4, 5, device=DEVICE, requires_grad=True)
    mask = unstructured_mask(dense, 0.5)
    assert mask.flatten().tolist() == [True] * 10 + [False] * 10  # ties go to the earlier row-major entry
    weight = prune_csr(dense, 0.5)
    assert not weight.values.requires_grad


@pytest.mark.parametrize(
    "sparsity,error,message",
    [
        (1.0, ValueError, r"sparsity: expected a float in \[0, 1\), got 1.0"),
        (-0.1, ValueError, r"sparsity: expected a float in \[0, 1\), got -0.1"),
        (float("nan"), ValueError, r"sparsity: expected a float in \[0, 1\), got nan"),
        ("0.5", TypeError, r"sparsity: expected a float in \[0, 1\), got str '0.5'"),
        (True, TypeError, r"sparsity: expected a float in \[0, 1\), got bool True"),
    ],
)
def test_prune_rejects_bad_sparsity(sparsity, error, message):
    with pytest.raises(error, match=message):
        prune_csr(torch.randn(4, 4, device=DEVICE), sparsity)


def test_prune_rejects_bad_weight():
    dense = torch.randn(4, 6, device=DEVICE)
    dense[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"weight: expected finite values, got nan at row 1, column 2"):
        unstructured_mask(dense, 0.5)
    with pytest.raises(TypeError, match=r"weight: expected dtype float16, bfloat16 or float32, got torch.int64"):
        unstructured_mask(torch.ones(4, 6, dtype=torch.long, device=DEVICE), 0.5)
    with pytest.raises(ValueError, match=r"weight: expected a non-empty matrix, got shape \(0, 6\)"):
        unstructured_mask(torch.ones(0, 6, device=DEVICE), 0.5)


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------


def test_torch_save_load_weights_only():
    weight = _weight(12, 20, torch.float16)
    buffer = io.BytesIO()
    torch.save({"layer": weight}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["layer"]
    assert isinstance(loaded, CSRWeight) and loaded.shape == weight.shape
    assert torch.equal(loaded.to_dense(), weight.to_dense())

    weight.col_indices[5] = 20  # tampered after validation: loading must refuse it
    buffer = io.BytesIO()
    torch.save(weight, buffer)
    buffer.seek(0)
    with pytest.raises(ValueError, match=r"col_indices: expected values in \[0, K=20\)"):
        torch.load(buffer, weights_only=True)


def test_state_round_trip():
    weight = _weight(12, 20, torch.bfloat16)
    tensors, fields = weight.state_tensors(), weight.state_fields()
    assert set(tensors) == set(CSRWeight.STATE_TENSORS) and set(fields) == set(CSRWeight.STATE_FIELDS)
    assert fields == {"shape": [12, 20], "dtype": "bfloat16"}
    loaded = CSRWeight.from_state(tensors, fields)
    assert torch.equal(loaded.to_dense(), weight.to_dense())
    with pytest.raises(ValueError, match=r"dtype: metadata says 'float16', but the stored values are torch.bfloat16"):
        CSRWeight.from_state(tensors, {**fields, "dtype": "float16"})
    with pytest.raises(ValueError, match=r"row_offsets: expected shape \(14,\), got \(13,\)"):
        CSRWeight.from_state(tensors, {**fields, "shape": [13, 20]})


# ---------------------------------------------------------------------------------------------------------
# Kernels (poisoned outputs)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,rows,cols,with_bias", [(1, 45, 70, True), (7, 45, 70, False), (33, 21, 70, True)])
def test_spmm_kernel(tokens, rows, cols, with_bias, dtype):
    weight = _weight(rows, cols, dtype)
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype)
    bias = torch.randn(rows, device=DEVICE).to(dtype) if with_bias else None
    out = torch.full((tokens, rows), float("nan"), dtype=dtype, device=DEVICE)
    csr_spmm(x.t().contiguous(), weight.values, weight.col_indices, weight.row_offsets, weight.row_order(), out, bias)
    assert relative_error(out, _reference(x, weight, bias)) < TOLERANCE[dtype]


def test_spmm_kernel_strided_operands_and_empty_matrix():
    weight = _weight(21, 70)
    x = torch.randn(9, 70, device=DEVICE)
    out_t = torch.full((21, 9), float("nan"), device=DEVICE)  # feature-major output: out = out_t.t()
    csr_spmm(x.t(), weight.values, weight.col_indices, weight.row_offsets, weight.row_order(), out_t.t())
    assert relative_error(out_t.t(), _reference(x, weight, None)) < TOLERANCE[torch.float32]

    empty = CSRWeight.from_dense(torch.randn(6, 9, device=DEVICE), torch.zeros(6, 9, dtype=torch.bool, device=DEVICE))
    bias = torch.randn(6, device=DEVICE)
    for b in (bias, None):
        out = torch.full((3, 6), float("nan"), device=DEVICE)
        args = (empty.values, empty.col_indices, empty.row_offsets, empty.row_order())
        csr_spmm(torch.randn(9, 3, device=DEVICE), *args, out, b)
        assert torch.equal(out, (b if b is not None else torch.zeros(6, device=DEVICE)).expand(3, 6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", [1, 37])
def test_sddmm_kernel(dtype, depth):
    weight = _weight(45, 70, dtype)
    a = torch.randn(45, depth, device=DEVICE).to(dtype)
    b = torch.randn(70, depth, device=DEVICE).to(dtype)
    out = torch.full((weight.nnz,), float("nan"), dtype=dtype, device=DEVICE)
    sddmm_kernel(a, b, weight.row_indices(), weight.col_indices, out)
    expected = (a.double() @ b.double().t())[weight.mask()]
    assert relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols,depth,sparsity", [(70, 130, 40, 0.9), (64, 64, 64, 0.5), (5, 200, 17, 0.0)])
def test_sddmm_tiled_kernel(dtype, rows, cols, depth, sparsity):
    weight = prune_csr(torch.randn(rows, cols, device=DEVICE).to(dtype), sparsity)
    a = torch.randn(rows, depth, device=DEVICE).to(dtype)
    b = torch.randn(cols, depth, device=DEVICE).to(dtype)
    out = torch.full((weight.nnz,), float("nan"), dtype=dtype, device=DEVICE)
    sddmm_tiled(a, b, weight.tile_offsets(CELL), weight.col_indices, out)
    expected = (a.double() @ b.double().t())[weight.mask()]
    assert relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sddmm_tiled_kernel_wide_tiles_stop_at_the_last_cell(dtype, monkeypatch):
    # 150 columns make 3 cells of 64; the second 128-wide tile covers only the third, not the next row's first.
    sddmm_module = importlib.import_module("nmspmm.kernels.sddmm")  # the package exports a function of that name
    monkeypatch.setattr(sddmm_module, "sddmm_tile", lambda depth, dtype: SddmmTile(32, 2 * CELL, 32, 4, 1))
    weight = prune_csr(torch.randn(40, 150, device=DEVICE).to(dtype), 0.3)
    a = torch.randn(40, 48, device=DEVICE).to(dtype)
    b = torch.randn(150, 48, device=DEVICE).to(dtype)
    out = torch.full((weight.nnz,), float("nan"), dtype=dtype, device=DEVICE)
    sddmm_tiled(a, b, weight.tile_offsets(CELL), weight.col_indices, out)
    assert relative_error(out, (a.double() @ b.double().t())[weight.mask()]) < TOLERANCE[dtype]


def test_sddmm_tiled_kernel_checks_the_offsets_shape():
    weight = _weight(20, 130)
    a, b = torch.randn(20, 64, device=DEVICE), torch.randn(130, 64, device=DEVICE)
    out = torch.empty(weight.nnz, device=DEVICE)
    with pytest.raises(ValueError, match="cell_offsets: expected 61 entries"):
        sddmm_tiled(a, b, weight.tile_offsets(32), weight.col_indices, out)


@pytest.mark.parametrize("rows,cols,width", [(9, 130, 64), (1, 64, 64), (12, 7, 4)])
def test_tile_offsets_start_every_run_of_a_row_tile(rows, cols, width):
    mask = torch.rand(rows, cols) < 0.4
    mask[rows // 2] = False  # an empty row
    weight = CSRWeight.from_dense(torch.randn(rows, cols), mask)
    offsets = tile_offsets_of(weight.row_indices(), weight.col_indices, rows, cols, width)
    tiles = -(-cols // width)
    counts = torch.zeros(rows, tiles, dtype=torch.int64)
    for r, c in mask.nonzero().tolist():
        counts[r, c // width] += 1
    expected = torch.cat([torch.zeros(1, dtype=torch.int64), counts.flatten().cumsum(0)])
    assert offsets.dtype == torch.int32 and torch.equal(offsets.long(), expected)
    assert weight.tile_offsets(width) is weight.tile_offsets(width)


@pytest.mark.parametrize("width", [0, -64, 64.0, True])
def test_tile_offsets_reject_a_width_that_is_not_a_positive_int(width):
    with pytest.raises(ValueError, match=r"width: expected a positive number of columns, got"):
        _weight(4, 8).tile_offsets(width)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sddmm_op_long_reduction_takes_the_tiled_kernel(backend, monkeypatch):
    import nmspmm.ops.csr as csr_ops

    calls = []
    monkeypatch.setattr(csr_ops, "sddmm_tiled", lambda *args: calls.append(1) or sddmm_tiled(*args))
    weight = _weight(45, 70, torch.float16)
    a = torch.randn(45, 100, device=DEVICE).half()
    b = torch.randn(70, 100, device=DEVICE).half()
    expected = (a.double() @ b.double().t()) * weight.mask()
    assert relative_error(sddmm(a, b, weight, backend=backend).to_dense(), expected) < TOLERANCE[torch.float16]
    assert len(calls) == (1 if backend == "triton" or DEVICE == "cuda" else 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity,tiled", [(0.5, True), (0.99, False)])
def test_exact_fp32_sddmm_takes_the_tiled_kernel_unless_very_sparse(backend, sparsity, tiled, monkeypatch):
    import nmspmm.ops.csr as csr_ops

    calls = []
    monkeypatch.setattr(csr_ops, "sddmm_tiled", lambda *args: calls.append(args[-1]) or sddmm_tiled(*args))
    weight = prune_csr(torch.randn(64, 160, device=DEVICE), sparsity)
    a = torch.randn(64, 96, device=DEVICE)
    b = torch.randn(160, 96, device=DEVICE)
    expected = (a.double() @ b.double().t()) * weight.mask()
    assert relative_error(sddmm(a, b, weight, backend=backend).to_dense(), expected) < TOLERANCE[torch.float32]
    uses_kernels = backend == "triton" or DEVICE == "cuda"
    assert calls == (["tf32x3"] if tiled and uses_kernels else [])
    # The weight caches the tiled kernel's offsets only when that kernel runs.
    assert ("tile_offsets_64" in weight._derived) == (tiled and uses_kernels)


# ---------------------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,with_bias", [((1,), True), ((2, 3), False)])
def test_csr_linear(backend, lead, with_bias):
    weight = _weight(45, 70, torch.float16)
    x = torch.randn(*lead, 70, device=DEVICE).half()
    bias = torch.randn(45, device=DEVICE).half() if with_bias else None
    y = csr_linear(x, weight, bias, backend=backend)
    assert y.shape == (*lead, 45) and y.dtype == torch.float16 and y.is_contiguous()
    assert relative_error(y, _reference(x, weight, bias)) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_csr_linear_feature_major_and_strided(backend):
    weight = _weight(21, 70)
    bias = torch.randn(21, device=DEVICE)
    x = torch.randn(9, 140, device=DEVICE)[:, ::2]  # no unit stride anywhere
    y_t = csr_linear_feature_major(x.t(), weight, bias, backend=backend)
    assert y_t.shape == (21, 9) and y_t.is_contiguous()
    assert relative_error(y_t.t(), _reference(x, weight, bias)) < TOLERANCE[torch.float32]
    y = csr_linear(x, weight, bias, backend=backend)
    assert relative_error(y, _reference(x, weight, bias)) < TOLERANCE[torch.float32]
    empty = CSRWeight.from_dense(torch.randn(6, 70, device=DEVICE), torch.zeros(6, 70, dtype=torch.bool, device=DEVICE))
    assert torch.equal(csr_linear(x, empty, bias[:6], backend=backend), bias[:6].expand(9, 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sddmm_op(backend):
    weight = _weight(45, 70, torch.bfloat16)
    a = torch.randn(45, 13, device=DEVICE).bfloat16()
    b = torch.randn(13, 70, device=DEVICE).bfloat16().t()  # a transposed view: the op copies it tiled
    sampled = sddmm(a, b, weight, backend=backend)
    assert isinstance(sampled, CSRWeight) and sampled.dtype == torch.bfloat16
    assert sampled.col_indices is weight.col_indices and sampled.row_offsets is weight.row_offsets
    expected = (a.double() @ b.double().t()) * weight.mask()
    assert relative_error(sampled.to_dense(), expected) < TOLERANCE[torch.bfloat16]


def test_cpu_triton_needs_interpreter(monkeypatch):
    weight = _weight(8, 10).cpu()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend: 'triton' on the CPU needs TRITON_INTERPRET=1"):
        csr_linear(torch.randn(2, 10), weight, backend="triton")


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda w: (torch.randn(4, 20).double(), w, None), TypeError, r"x: dtype torch.float64 does not match"),
        (lambda w: (torch.randn(4, 19), w, None), ValueError, r"x: expected last dimension K=20"),
        (lambda w: (torch.tensor(1.0), w, None), ValueError, r"x: expected last dimension K=20"),
        (lambda w: ([[1.0] * 20], w, None), TypeError, r"x: expected a torch.Tensor"),
        (lambda w: (torch.randn(4, 20, device="meta"), w, None), ValueError, r"x: on meta, but weight is on cpu"),
        (lambda w: (torch.randn(4, 20), w.to_dense(), None), TypeError, r"weight: expected an nmspmm.CSRWeight"),
        (lambda w: (torch.randn(4, 20), w, torch.randn(11)), ValueError, r"bias: expected shape \(12,\)"),
        (lambda w: (torch.randn(4, 20), w, torch.randn(12).half()), TypeError, r"bias: dtype torch.float16"),
    ],
)
def test_csr_linear_rejects_bad_input(make_args, error, match):
    x, weight, bias = make_args(_weight(12, 20).cpu())
    with pytest.raises(error, match=match):
        csr_linear(x, weight, bias)


def test_bad_backend():
    weight = _weight(12, 20)
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        csr_linear(torch.randn(4, 20, device=DEVICE), weight, backend="dense")
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        sddmm(torch.randn(12, 3, device=DEVICE), torch.randn(20, 3, device=DEVICE), weight, backend="dense")


def test_csr_linear_feature_major_rejects_bad_input():
    weight = _weight(12, 20)
    with pytest.raises(ValueError, match=r"x_t: expected first dimension K=20"):
        csr_linear_feature_major(torch.randn(4, 20, device=DEVICE), weight)
    with pytest.raises(ValueError, match=r"x_t: expected a 2-D \[K, M\] feature-major tensor"):
        csr_linear_feature_major(torch.randn(20, 2, 3, device=DEVICE), weight)


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda w: (torch.randn(12, 5), torch.randn(20, 5), w.to_dense()), TypeError, r"weight: expected an nmspmm"),
        (lambda w: ([0.0], torch.randn(20, 5), w), TypeError, r"a: expected a torch.Tensor, got list"),
        (lambda w: (torch.randn(12, 5).half(), torch.randn(20, 5), w), TypeError, r"a: dtype torch.float16 does not"),
        (lambda w: (torch.randn(12, 5), torch.randn(20, 5).half(), w), TypeError, r"b: dtype torch.float16 does not"),
        (lambda w: (torch.randn(12, 5, device="meta"), torch.randn(20, 5), w), ValueError, r"a: on meta, but weight"),
        (lambda w: (torch.randn(11, 5), torch.randn(20, 5), w), ValueError, r"a: expected shape \[N=12, D\] with D"),
        (lambda w: (torch.randn(12, 5), torch.randn(20), w), ValueError, r"b: expected shape \[K=20, D\] with D >= 1"),
        (lambda w: (torch.randn(12, 0), torch.randn(20, 0), w), ValueError, r"a: expected shape \[N=12, D\] with D >="),
        (lambda w: (torch.randn(12, 5), torch.randn(20, 4), w), ValueError, r"b: expected D=5 columns like a"),
        (
            lambda w: (torch.randn(12, 5, requires_grad=True), torch.randn(20, 5), w),
            ValueError, r"a, b: sddmm is not differentiable",
        ),
    ],
)
def test_sddmm_rejects_bad_input(make_args, error, match):
    a, b, weight = make_args(_weight(12, 20).cpu())
    with pytest.raises(error, match=match):
        sddmm(a, b, weight)


# ---------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------


def _op_inputs(weight: CSRWeight, x: torch.Tensor, bias: torch.Tensor | None, backend: str) -> tuple:
    """All the custom op's arguments, backward structures included."""
    transposed = weight.transposed_structure()
    return (
        x, weight.values, weight.col_indices, weight.row_offsets, weight.row_order(), bias,
        weight.row_indices(), weight.tile_offsets(CELL), *transposed[:2], transposed.permutation,
        transposed.row_order, backend,
    )  # fmt: skip


def test_gradcheck_reference_float64():
    weight = _weight(6, 10, density=0.5).cpu()
    values = weight.values.double().requires_grad_()
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    _, _, columns, offsets, order, _, rows, cells, *transposed, _ = _op_inputs(weight, x, bias, "reference")

    def product(x, values, bias):
        return csr_linear_op(x, values, columns, offsets, order, bias, rows, cells, *transposed, "reference")

    assert torch.autograd.gradcheck(product, (x, values, bias))


@pytest.mark.parametrize(
    "backend,dtype,feature_major,tokens",
    [
        ("reference", torch.float32, False, 9),
        ("reference", torch.float16, True, 9),
        ("triton", torch.float32, False, 9),
        ("triton", torch.bfloat16, True, 9),
        ("triton", torch.float16, False, 1),
    ]
    if DEVICE == "cpu"
    else [("auto", dtype, fm, tokens) for dtype in DTYPES for fm in (False, True) for tokens in (1, 9)],
)
def test_gradients_match_dense_masked(backend, dtype, feature_major, tokens):
    rows, cols = 21, 70
    weight = _weight(rows, cols, dtype)
    mask = weight.mask()
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype)
    bias = torch.randn(rows, device=DEVICE).to(dtype)
    grad_y = torch.randn(tokens, rows, device=DEVICE).to(dtype)

    x_in = (x.t().contiguous() if feature_major else x.clone()).requires_grad_()
    bias_in = bias.clone().requires_grad_()
    sparse = weight._with_values(weight.values.clone().requires_grad_())
    if feature_major:
        csr_linear_feature_major(x_in, sparse, bias_in, backend=backend).backward(grad_y.t())
        grad_x = x_in.grad.t()
    else:
        csr_linear(x_in, sparse, bias_in, backend=backend).backward(grad_y)
        grad_x = x_in.grad

    dense_w = weight.to_dense().double().requires_grad_()
    x_ref = x.double().requires_grad_()
    (x_ref @ dense_w.t()).backward(grad_y.double())
    assert relative_error(grad_x, x_ref.grad) < TOLERANCE[dtype]
    assert relative_error(sparse.values.grad, dense_w.grad[mask]) < TOLERANCE[dtype]
    assert relative_error(bias_in.grad, grad_y.double().sum(0)) < TOLERANCE[dtype]


@pytest.mark.parametrize("backend", ["reference", "triton"] if DEVICE == "cpu" else ["auto"])
def test_backward_derives_missing_structures(backend):
    # A direct op call without the backward structures: the backward derives them.
    weight = _weight(21, 70)
    x = torch.randn(5, 70, device=DEVICE, requires_grad=True)
    values = weight.values.clone().requires_grad_()
    grad_y = torch.randn(5, 21, device=DEVICE)
    args = (x, values, weight.col_indices, weight.row_offsets, weight.row_order(), None) + (None,) * 6
    csr_linear_op(*args, backend).backward(grad_y)
    dense_w = weight.to_dense().double()
    assert relative_error(x.grad, grad_y.double() @ dense_w) < TOLERANCE[torch.float32]
    expected_values = (grad_y.double().t() @ x.detach().double())[weight.mask()]
    assert relative_error(values.grad, expected_values) < TOLERANCE[torch.float32]


def test_frozen_weight_derives_only_what_it_needs():
    weight = _weight(21, 70)
    x = torch.randn(5, 70, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        csr_linear(x, weight)
    assert set(weight._derived) == {"row_order"}  # inference derives no backward structure
    csr_linear(x, weight).sum().backward()
    assert set(weight._derived) == {"row_order", "row_indices", "transposed"}
    assert relative_error(x.grad, weight.to_dense().double().sum(0).expand(5, 70)) < TOLERANCE[torch.float32]


# ---------------------------------------------------------------------------------------------------------
# torch.compile and opcheck
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compile_fullgraph(fresh_dynamo, compile_backend):
    weight = _weight(21, 70)  # nothing derived yet: the compiled function derives and caches it
    bias = torch.randn(21, device=DEVICE)

    def layer(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(csr_linear(x, weight, bias))

    compiled = torch.compile(layer, fullgraph=True, backend=compile_backend)
    for shape in [(5, 70), (2, 7, 70)]:
        x = torch.randn(shape, device=DEVICE)
        assert relative_error(compiled(x), layer(x)) < TOLERANCE[torch.float32]


def test_compile_training_step(fresh_dynamo):
    first, second = _weight(21, 70), _weight(3, 21)
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


def _op_samples() -> list[object]:
    backends = ["reference", "triton"] if DEVICE == "cpu" else ["auto"]
    samples = []
    for backend in backends:
        weight = _weight(8, 12, density=0.4)
        x = torch.randn(3, 12, device=DEVICE)
        bias = torch.randn(8, device=DEVICE)
        args = _op_inputs(weight, x, bias, backend)
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


@pytest.mark.parametrize("op,args", _op_samples())
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------------------
# GPU: realistic shapes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 16, 256, 1024])
def test_spmm_kernel_large(tokens, dtype):
    weight = prune_csr(torch.randn(4096, 4096, device=DEVICE).to(dtype), 0.9)
    x = torch.randn(tokens, 4096, device=DEVICE).to(dtype)
    bias = torch.randn(4096, device=DEVICE).to(dtype)
    out = torch.full((tokens, 4096), float("nan"), dtype=dtype, device=DEVICE)
    csr_spmm(x.t().contiguous(), weight.values, weight.col_indices, weight.row_offsets, weight.row_order(), out, bias)
    assert relative_error(out, _reference(x, weight, bias)) < TOLERANCE[dtype]
    assert relative_error(csr_linear(x, weight, bias), _reference(x, weight, bias)) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_spmm_imbalanced_rows_large(dtype):
    # Row densities from 0 to 100%: the row swizzle must still cover every row.
    density = torch.linspace(0, 1, 3000, device=DEVICE)[torch.randperm(3000, device=DEVICE)]
    mask = torch.rand(3000, 2048, device=DEVICE) < density[:, None] ** 4
    weight = CSRWeight.from_dense(torch.randn(3000, 2048, device=DEVICE).to(dtype), mask)
    x = torch.randn(333, 2048, device=DEVICE).to(dtype)
    assert relative_error(csr_linear(x, weight), _reference(x, weight, None)) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", [16, 1000])
def test_sddmm_kernel_large(dtype, depth):
    weight = prune_csr(torch.randn(4096, 4096, device=DEVICE).to(dtype), 0.9)
    a = torch.randn(4096, depth, device=DEVICE).to(dtype)
    b = torch.randn(4096, depth, device=DEVICE).to(dtype)
    out = torch.full((weight.nnz,), float("nan"), dtype=dtype, device=DEVICE)
    sddmm_kernel(a, b, weight.row_indices(), weight.col_indices, out)
    expected = (a.double() @ b.double().t())[weight.mask()]
    assert relative_error(out, expected) < TOLERANCE[dtype]
    tiled = torch.full((weight.nnz,), float("nan"), dtype=dtype, device=DEVICE)
    sddmm_tiled(a, b, weight.tile_offsets(CELL), weight.col_indices, tiled)
    assert relative_error(tiled, expected) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_large(dtype):
    weight = prune_csr(torch.randn(1024, 2048, device=DEVICE).to(dtype), 0.9)
    x = torch.randn(300, 2048, device=DEVICE).to(dtype).requires_grad_()
    sparse = weight._with_values(weight.values.clone().requires_grad_())
    grad_y = torch.randn(300, 1024, device=DEVICE).to(dtype)
    csr_linear(x, sparse).backward(grad_y)
    dense_w = weight.to_dense().double()
    assert relative_error(x.grad, grad_y.double() @ dense_w) < TOLERANCE[dtype]
    expected_values = (grad_y.double().t() @ x.detach().double())[weight.mask()]
    assert relative_error(sparse.values.grad, expected_values) < TOLERANCE[dtype]
