"""The formats: NMSparseWeight (compression round trips, storage size), CSRWeight (round trips, derived
structures and tile offsets) and BlockShuffledWeight (round trips, block layout), and every argument check of
each format, its from_dense and its constructor."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, block_mask, block_weight, csr_mask, csr_weight
from nmspmm import NMSparseWeight
from nmspmm.formats import SUPPORTED_DTYPES, SUPPORTED_M, SUPPORTED_VECTORS
from nmspmm.formats.block_shuffled import BlockShuffledWeight
from nmspmm.formats.csr import CSRWeight, tile_offsets_of

N, K = 128, 64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROUND_TRIP_PATTERNS = [
    "1:4", "2:4", "3:4",
    "1:8", "4:8", "5:8", "7:8",
    "2:16", "8:16", "13:16", "15:16",
    "1:32", "8:32", "16:32", "24:32", "31:32",
    "1:64", "4:64", "32:64", "48:64", "63:64",
]  # fmt: skip


def random_nm_mask(rows: int, cols: int, n: int, m: int, vector: int) -> torch.Tensor:
    """A uniformly random vector-wise n:m mask."""
    kept = torch.rand(rows // vector, cols // m, m).argsort(-1)[..., :n]
    group_mask = torch.zeros(rows // vector, cols // m, m, dtype=torch.bool).scatter_(-1, kept, True)
    return group_mask.repeat_interleave(vector, 0).reshape(rows, cols)


def nm_of(pattern: str) -> tuple[int, int]:
    n, m = pattern.split(":")
    return int(n), int(m)


def make_weight(pattern: str = "2:4", vector: int = 16, dtype: torch.dtype = torch.float32) -> NMSparseWeight:
    n, m = nm_of(pattern)
    mask = random_nm_mask(N, K, n, m, vector)
    return NMSparseWeight.from_dense(torch.randn(N, K, dtype=dtype), mask, pattern, vector)


@pytest.mark.parametrize("vector", SUPPORTED_VECTORS)
@pytest.mark.parametrize("pattern", ROUND_TRIP_PATTERNS)
def test_round_trip(pattern: str, vector: int) -> None:
    n, m = nm_of(pattern)
    for dtype in SUPPORTED_DTYPES:
        weight = torch.randn(N, K, dtype=dtype)
        mask = random_nm_mask(N, K, n, m, vector)
        sparse = NMSparseWeight.from_dense(weight, mask, pattern, vector)

        assert sparse.pattern == pattern and sparse.vector == vector and sparse.shape == (N, K)
        assert sparse.dtype == dtype and sparse.offsets.dtype == torch.uint8
        assert sparse.values.shape == (N, K // m * n)
        assert sparse.offsets.shape == (N // vector, K // m, min(n, m - n))
        assert sparse.stores_dropped == (n > m - n)
        assert torch.equal(sparse.mask(), mask)
        assert torch.equal(sparse.to_dense(), torch.where(mask, weight, torch.zeros((), dtype=dtype)))
        assert torch.equal(sparse.values, weight[mask].view(N, -1))

        kept = sparse.kept_offsets().long().view(N // vector, K // m, n)
        assert bool((kept[..., 1:] > kept[..., :-1]).all()) and bool((kept < m).all())
        columns = sparse.kept_columns()
        assert columns.shape == (N // vector, K // m * n)
        assert torch.equal(mask[::vector].nonzero()[:, 1].view(N // vector, -1), columns)


def test_round_trip_non_contiguous_inputs() -> None:
    mask = random_nm_mask(N, K, 2, 8, 16)
    weight = torch.randn(K, N).t()
    sparse = NMSparseWeight.from_dense(weight, mask.t().contiguous().t(), "2:8", 16)
    assert torch.equal(sparse.mask(), mask)
    assert torch.equal(sparse.to_dense(), weight * mask)


def test_pruned_entries_may_be_non_finite() -> None:
    mask = random_nm_mask(N, K, 2, 4, 1)
    weight = torch.randn(N, K).masked_fill(~mask, float("nan"))
    assert torch.equal(NMSparseWeight.from_dense(weight, mask, "2:4").to_dense(), weight.nan_to_num(0.0))


def test_nbytes_below_dense_for_every_pattern_dtype_and_vector() -> None:
    for m in SUPPORTED_M:
        for n in range(1, m):
            for vector in SUPPORTED_VECTORS:
                mask = random_nm_mask(N, K, n, m, vector)
                for dtype in SUPPORTED_DTYPES:
                    sparse = NMSparseWeight.from_dense(torch.randn(N, K, dtype=dtype), mask, f"{n}:{m}", vector)
                    size = sparse.values.element_size()
                    expected = N * (K // m * n) * size + (N // vector) * (K // m) * min(n, m - n) + 5 * 8
                    assert sparse.nbytes == expected, (n, m, vector, dtype)
                    assert sparse.nbytes < N * K * size, (n, m, vector, dtype)


def test_to_dtype_and_cpu() -> None:
    sparse = make_weight("5:8", 32, torch.float32)
    half = sparse.to(torch.float16)
    assert half.dtype == torch.float16 and half.pattern == "5:8" and half.vector == 32
    assert torch.equal(half.offsets, sparse.offsets)
    assert torch.equal(half.to_dense(), sparse.to_dense().half())
    assert half.nbytes < sparse.nbytes

    cpu = sparse.cpu()
    assert cpu.device == torch.device("cpu")
    assert torch.equal(cpu.to_dense(), sparse.to_dense())
    with pytest.raises(TypeError, match="values: expected a float16, bfloat16 or float32 tensor, got torch.int32"):
        sparse.to(torch.int32)


# ---- argument checks of from_dense --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "error", "message"),
    [
        ("3:7", ValueError, r"pattern: m must be one of .*got m=7"),
        ("4:4", ValueError, r"pattern: n must satisfy 1 <= n < m, got n=4, m=4"),
        ("9:8", ValueError, r"pattern: n must satisfy 1 <= n < m, got n=9, m=8"),
        ("0:8", ValueError, r"pattern: n must satisfy 1 <= n < m, got n=0, m=8"),
        ("8-32", ValueError, r"pattern: expected 'n:m'.*got '8-32'"),
        ("2:4:8", ValueError, r"pattern: expected 'n:m'.*got '2:4:8'"),
        ("-1:4", ValueError, r"pattern: expected 'n:m'.*got '-1:4'"),
        (8, TypeError, r"pattern: expected a string like '8:32', got int 8"),
    ],
)
def test_bad_pattern(pattern: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        NMSparseWeight.from_dense(torch.randn(N, K), torch.ones(N, K, dtype=torch.bool), pattern, 1)


@pytest.mark.parametrize(
    ("vector", "error", "message"),
    [
        (8, ValueError, r"vector: expected one of \(1, 16, 32, 64, 128\), got 8"),
        (0, ValueError, r"vector: expected one of .*got 0"),
        (True, TypeError, r"vector: expected an int .*got bool True"),
        (16.0, TypeError, r"vector: expected an int .*got float 16.0"),
    ],
)
def test_bad_vector(vector: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        NMSparseWeight.from_dense(torch.randn(N, K), random_nm_mask(N, K, 2, 4, 16), "2:4", vector)


def test_vector_must_divide_out_features() -> None:
    weight = torch.randn(48, K)
    with pytest.raises(ValueError, match=r"vector: V=32 must divide out_features N=48 of weight"):
        NMSparseWeight.from_dense(weight, random_nm_mask(48, K, 2, 4, 16), "2:4", 32)


@pytest.mark.parametrize(
    ("weight", "error", "message"),
    [
        (torch.ones(N, K, dtype=torch.int32), TypeError, r"weight: expected dtype float16, .*got torch.int32"),
        (torch.ones(N, K, dtype=torch.float64), TypeError, r"weight: expected dtype .*got torch.float64"),
        (torch.ones(0, K), ValueError, r"weight: expected a non-empty matrix, got shape \(0, 64\)"),
        (torch.ones(N, 0), ValueError, r"weight: expected a non-empty matrix, got shape \(128, 0\)"),
        (torch.ones(N * K), ValueError, r"weight: expected a 2-D .*got shape \(8192,\)"),
        (torch.ones(N, 66), ValueError, r"weight: in_features K=66 must be divisible by m=4"),
        ([[1.0] * 4], TypeError, r"weight: expected a torch.Tensor, got list"),
    ],
)
def test_bad_weight(weight: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        NMSparseWeight.from_dense(weight, torch.ones(N, K, dtype=torch.bool), "2:4", 1)


def test_mask_not_n_m_says_where() -> None:
    mask = random_nm_mask(N, K, 2, 4, 16)
    mask[16:32, 4:8] = True  # 4 kept in rows 16..31, features 4..7
    with pytest.raises(ValueError, match=r"mask: not 2:4: rows 16..31, input features 4..7 keep 4, expected 2"):
        NMSparseWeight.from_dense(torch.randn(N, K), mask, "2:4", 16)


def test_mask_not_vector_wise_says_which_row() -> None:
    mask = random_nm_mask(N, K, 2, 4, 16)
    mask[37, 8:12] = ~mask[37, 8:12]
    with pytest.raises(ValueError, match=r"mask: not vector-wise with V=16: row 37 differs from row 32 .*8..11"):
        NMSparseWeight.from_dense(torch.randn(N, K), mask, "2:4", 16)


def test_mask_shape_device_and_dtype() -> None:
    weight = torch.randn(N, K)
    with pytest.raises(ValueError, match=r"mask: expected shape \(128, 64\) like weight, got \(128, 32\)"):
        NMSparseWeight.from_dense(weight, torch.ones(N, K // 2, dtype=torch.bool), "2:4")
    with pytest.raises(ValueError, match=r"mask: on meta, but weight is on cpu"):
        NMSparseWeight.from_dense(weight, torch.ones(N, K, dtype=torch.bool, device="meta"), "2:4")
    with pytest.raises(TypeError, match=r"mask: expected a bool .*got torch.float32"):
        NMSparseWeight.from_dense(weight, random_nm_mask(N, K, 2, 4, 1).float(), "2:4")
    with pytest.raises(TypeError, match=r"mask: expected a bool .*got torch.int64"):
        NMSparseWeight.from_dense(weight, random_nm_mask(N, K, 2, 4, 1).long() * 2, "2:4")
    with pytest.raises(TypeError, match=r"mask: expected a torch.Tensor, got list"):
        NMSparseWeight.from_dense(weight, [[True] * K] * N, "2:4")
    mask = random_nm_mask(N, K, 2, 4, 1)
    assert torch.equal(NMSparseWeight.from_dense(weight, mask.to(torch.uint8), "2:4").mask(), mask)


def test_kept_entries_must_be_finite() -> None:
    mask = random_nm_mask(N, K, 2, 4, 1)
    weight = torch.randn(N, K)
    row, col = mask.nonzero()[0].tolist()
    weight[row, col] = float("inf")
    with pytest.raises(ValueError, match=r"weight: kept entries must be finite"):
        NMSparseWeight.from_dense(weight, mask, "2:4")


# ---- the constructor validates raw tensors -------------------------------------------------------------------


def parts(pattern: str = "3:8", vector: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    sparse = make_weight(pattern, vector)
    return sparse.values.clone(), sparse.offsets.clone()


@pytest.mark.parametrize("pattern", ["3:8", "6:8"])
def test_constructor_accepts_valid_tensors(pattern: str) -> None:
    values, offsets = parts(pattern)
    sparse = NMSparseWeight(values, offsets, pattern, 16, (N, K))
    assert sparse.shape == (N, K) and sparse.values is values


def test_constructor_rejects_bad_shapes_and_dtypes() -> None:
    values, offsets = parts()
    with pytest.raises(ValueError, match=r"values: expected shape \(128, 24\), got \(128, 23\)"):
        NMSparseWeight(values[:, :-1], offsets, "3:8", 16, (N, K))
    with pytest.raises(TypeError, match=r"values: expected a float16, bfloat16 or float32 tensor, got torch.float64"):
        NMSparseWeight(values.double(), offsets, "3:8", 16, (N, K))
    with pytest.raises(TypeError, match=r"values: expected .*got list"):
        NMSparseWeight(values.tolist(), offsets, "3:8", 16, (N, K))
    with pytest.raises(TypeError, match=r"offsets: expected a uint8 tensor, got torch.int64"):
        NMSparseWeight(values, offsets.long(), "3:8", 16, (N, K))
    with pytest.raises(ValueError, match=r"offsets: expected shape \(8, 8, 3\), got \(8, 8, 2\)"):
        NMSparseWeight(values, offsets[..., :2], "3:8", 16, (N, K))
    with pytest.raises(ValueError, match=r"offsets: expected shape \(4, 8, 3\), got \(8, 8, 3\)"):
        NMSparseWeight(values, offsets, "3:8", 32, (N, K))
    with pytest.raises(ValueError, match=r"offsets: on meta, but values are on cpu"):
        NMSparseWeight(values, offsets.to("meta"), "3:8", 16, (N, K))
    with pytest.raises(ValueError, match=r"shape: expected \(N, K\) with N, K > 0, got \(128, 64, 1\)"):
        NMSparseWeight(values, offsets, "3:8", 16, (N, K, 1))
    with pytest.raises(ValueError, match=r"shape: K=60 must be divisible by m=8"):
        NMSparseWeight(values, offsets, "3:8", 16, (N, 60))
    with pytest.raises(ValueError, match=r"vector: V=16 must divide N=120"):
        NMSparseWeight(values, offsets, "3:8", 16, (120, K))


def test_constructor_rejects_out_of_range_offsets() -> None:
    values, offsets = parts()
    offsets[5, 3, 2] = 8
    with pytest.raises(ValueError, match=r"offsets: every offset must be < m=8, got max 8"):
        NMSparseWeight(values, offsets, "3:8", 16, (N, K))


@pytest.mark.parametrize("pattern", ["3:8", "5:8"])
def test_constructor_rejects_non_ascending_offsets(pattern: str) -> None:
    values, offsets = parts(pattern)
    offsets[6, 2] = offsets[6, 2].flip(-1)
    with pytest.raises(ValueError, match=r"offsets: must be strictly ascending .*V-group 6, input group 2 is not"):
        NMSparseWeight(values, offsets, pattern, 16, (N, K))
    offsets[6, 2] = offsets[6, 2, :1]  # repeated positions
    with pytest.raises(ValueError, match=r"offsets: must be strictly ascending .*V-group 6, input group 2 is not"):
        NMSparseWeight(values, offsets, pattern, 16, (N, K))


# ---- CSRWeight: round trips, derived structures, argument checks --------------------------------------------


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("dtype", DTYPES)
def test_csr_round_trip(dtype):
    dense = torch.randn(45, 70, device=DEVICE).to(dtype)
    mask = csr_mask(45, 70)
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


@pytest.mark.usefixtures("seeded")
def test_csr_derived_structures():
    weight = csr_weight(45, 70)
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


@pytest.mark.usefixtures("seeded")
def test_csr_empty_and_full_matrices():
    empty = CSRWeight.from_dense(torch.randn(6, 9, device=DEVICE), torch.zeros(6, 9, dtype=torch.bool, device=DEVICE))
    assert empty.nnz == 0 and empty.sparsity == 1.0
    assert torch.equal(empty.to_dense(), torch.zeros(6, 9, device=DEVICE))
    assert empty.transposed_structure().row_offsets.tolist() == [0] * 10
    full = CSRWeight.from_dense(torch.randn(6, 9, device=DEVICE), torch.ones(6, 9, dtype=torch.bool, device=DEVICE))
    assert full.nnz == 54 and full.col_indices.tolist() == list(range(9)) * 6


@pytest.mark.usefixtures("seeded")
def test_csr_to_cpu_and_repr():
    weight = csr_weight(12, 20)
    half = weight.to(torch.float16)
    assert half.dtype == torch.float16 and half.col_indices.dtype == torch.int32
    assert torch.equal(half.to_dense(), weight.to_dense().half())
    assert weight.cpu().device.type == "cpu"
    assert repr(weight).startswith(f"CSRWeight(shape=(12, 20), nnz={weight.nnz}, sparsity=")


def _csr_field_cases() -> list[object]:
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


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("change,error,message", _csr_field_cases())
def test_csr_constructor_rejects_bad_fields(change, error, message):
    weight = csr_weight(12, 20)
    fields = change(weight.values, weight.col_indices, weight.row_offsets, weight.shape)
    with pytest.raises(error, match=message):
        CSRWeight(*fields)


@pytest.mark.usefixtures("seeded")
def test_csr_from_dense_rejects_bad_input():
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


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("rows,cols,width", [(9, 130, 64), (1, 64, 64), (12, 7, 4)])
def test_csr_tile_offsets_start_every_run_of_a_row_tile(rows, cols, width):
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


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("width", [0, -64, 64.0, True])
def test_csr_tile_offsets_reject_a_width_that_is_not_a_positive_int(width):
    with pytest.raises(ValueError, match=r"width: expected a positive number of columns, got"):
        csr_weight(4, 8).tile_offsets(width)


# ---- BlockShuffledWeight: round trips, argument checks ------------------------------------------------------


def block_fields(weight: BlockShuffledWeight) -> dict:
    """The constructor's arguments, by name."""
    return {**weight.state_tensors(), "shape": tuple(weight.shape), "block": weight.block}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows,cols,block", [(96, 128, (32, 32)), (48, 80, (16, 16)), (128, 32, (64, 16)), (128, 256, (128, 128))]
)
def test_block_shuffled_round_trip(rows, cols, block, dtype):
    sparse, dense, mask = block_weight(rows, cols, block, dtype, empty_block_rows=(0,))
    bn, bk = block
    assert sparse.shape == (rows, cols) and sparse.block == block and sparse.dtype == dtype
    assert torch.equal(sparse.mask(), mask)
    assert torch.equal(sparse.to_dense(), torch.where(mask, dense, torch.zeros((), dtype=dtype)))
    assert sparse.values.shape == (int(mask.sum()) // (bn * bk), bn, bk)
    assert sparse.density == pytest.approx(float(mask.float().mean()))
    offsets = sparse.block_row_offsets.long()
    assert offsets[1] == 0  # block-row 0 was left empty
    permuted = dense[sparse.row_permutation.long()]
    for block_row in range(rows // bn):
        columns = sparse.block_columns[offsets[block_row] : offsets[block_row + 1]].long()
        assert bool((columns.diff() > 0).all())
        for j, column in zip(range(offsets[block_row], offsets[block_row + 1]), columns.tolist()):
            tile = permuted[block_row * bn : (block_row + 1) * bn, column * bk : (column + 1) * bk]
            assert torch.equal(sparse.values[j], tile)
    counts = offsets.diff()
    order = sparse.block_row_order.long()
    assert sparse.block_row_order.dtype == torch.int32 and sorted(order.tolist()) == list(range(rows // bn))
    assert bool((counts[order].diff() <= 0).all())


def test_block_shuffled_from_dense_identity_permutation_strided_weight_and_integer_mask():
    generator = torch.Generator().manual_seed(1)
    kept = block_mask(64, 96, (32, 16), 0.5, generator)
    mask = kept.repeat_interleave(32, 0).repeat_interleave(16, 1)
    weight = torch.randn(96, 64, generator=generator).t()
    sparse = BlockShuffledWeight.from_dense(weight, mask.int(), (32, 16))
    assert torch.equal(sparse.row_permutation, torch.arange(64, dtype=torch.int32))
    assert torch.equal(sparse.to_dense(), weight * mask)
    assert torch.equal(sparse.block_mask(), kept)


def test_block_shuffled_pruned_entries_may_be_non_finite():
    sparse, dense, mask = block_weight(64, 64, (16, 16))
    poisoned = dense.masked_fill(~mask, float("nan"))
    again = BlockShuffledWeight.from_dense(poisoned, mask, (16, 16), sparse.row_permutation)
    assert torch.equal(again.to_dense(), sparse.to_dense())


def test_block_shuffled_all_pruned_and_all_kept():
    weight = torch.randn(32, 64)
    empty = BlockShuffledWeight.from_dense(weight, torch.zeros(32, 64, dtype=torch.bool), (16, 32))
    assert empty.values.shape == (0, 16, 32) and not bool(empty.to_dense().any()) and empty.density == 0
    full = BlockShuffledWeight.from_dense(weight, torch.ones(32, 64, dtype=torch.bool), (16, 32))
    assert torch.equal(full.to_dense(), weight) and full.density == 1


def test_block_shuffled_nbytes_repr_and_to():
    sparse, _, _ = block_weight(64, 128, (32, 32), torch.float16, density=0.5)
    tensors = sparse.state_tensors().values()
    assert sparse.nbytes == sum(t.numel() * t.element_size() for t in tensors) + 32
    assert "BlockShuffledWeight(shape=(64, 128), block=(32, 32)" in repr(sparse)
    widened = sparse.to(torch.float32)
    assert widened.dtype == torch.float32 and widened.row_permutation.dtype == torch.int32
    assert torch.equal(widened.to_dense(), sparse.to_dense().float())
    assert sparse.cpu().device.type == "cpu"


def test_block_shuffled_from_dense_rejects_a_mixed_block():
    sparse, dense, mask = block_weight(64, 64, (16, 16), density=0.5)
    original_row = int(sparse.row_permutation[20])  # permuted row 20 lies in block-row 1
    mask[original_row, 33] = ~mask[original_row, 33]
    with pytest.raises(ValueError, match=r"mask: not block-structured with block \(16, 16\).* permuted rows 16..31, "
                                         r"columns 32..47 is partly kept"):
        BlockShuffledWeight.from_dense(dense, mask, (16, 16), sparse.row_permutation)


@pytest.mark.parametrize(
    "weight,mask,block,permutation,error,match",
    [
        (torch.randn(48, 64), None, (32, 16), None, ValueError, r"weight: shape \(48, 64\) is not a whole number"),
        (torch.randn(32, 64), None, (8, 16), None, ValueError, r"block: expected \(bn, bk\) with bn, bk in"),
        (torch.randn(32, 64), None, 32, None, TypeError, r"block: expected a pair"),
        (torch.randn(32, 64), None, (16, True), None, TypeError, r"block: expected two ints"),
        (torch.randn(32, 64).double(), None, (16, 16), None, TypeError, r"weight: expected dtype float16"),
        (torch.randn(32, 64), torch.ones(32, 32), (16, 16), None, ValueError, r"mask: expected shape \(32, 64\)"),
        (torch.randn(32, 64), torch.ones(32, 64), (16, 16), None, TypeError, r"mask: expected a bool"),
        (torch.randn(32, 64), None, (16, 16), torch.arange(32.0), TypeError, r"row_permutation: expected an int32"),
        (torch.randn(32, 64), None, (16, 16), torch.arange(31), ValueError, r"row_permutation: expected shape \(32,\)"),
        (torch.randn(32, 64), None, (16, 16), torch.zeros(32, dtype=torch.long), ValueError, r"row 0 appears 32 times"),
        (torch.randn(32, 64), None, (16, 16), torch.arange(1, 33), ValueError, r"got 32 at position 31"),
    ],
)
def test_block_shuffled_from_dense_rejects_bad_arguments(weight, mask, block, permutation, error, match):
    mask = torch.ones(weight.shape, dtype=torch.bool) if mask is None else mask
    with pytest.raises(error, match=match):
        BlockShuffledWeight.from_dense(weight, mask, block, permutation)


@pytest.mark.parametrize(
    "field,change,error,match",
    [
        ("values", lambda t: t.double(), TypeError, r"values: expected a float16, bfloat16 or float32 tensor"),
        ("values", lambda t: t[:, :, :8], ValueError, r"values: expected shape \(nblocks, 16, 16\)"),
        ("values", lambda t: t[:-1], ValueError, r"block_columns: expected shape \(\d+,\)"),
        ("block_columns", lambda t: t.long(), TypeError, r"block_columns: expected an int32 tensor"),
        ("block_columns", lambda t: t.fill_(4), ValueError, r"block_columns: expected block-columns in 0..3"),
        ("block_columns", lambda t: t.flip(0), ValueError, r"block_columns: must be strictly ascending"),
        ("block_columns", lambda t: t.to("meta"), ValueError, r"block_columns: on meta, but values are on cpu"),
        ("block_row_offsets", lambda t: t[:-1], ValueError, r"block_row_offsets: expected shape \(5,\)"),
        ("block_row_offsets", lambda t: t + 1, ValueError, r"block_row_offsets: expected to run from 0 to nblocks"),
        ("block_row_offsets", lambda t: t.index_fill_(0, torch.tensor([1]), 9), ValueError,
         r"block_row_offsets: block-row [01] holds"),
        ("row_permutation", lambda t: t.short(), TypeError, r"row_permutation: expected an int32 tensor"),
        ("row_permutation", lambda t: t.index_fill_(0, torch.tensor([5]), -1), ValueError,
         r"row_permutation: expected values in 0..63, got -1 at position 5"),
        ("row_permutation", lambda t: t.index_fill_(0, torch.tensor([5]), int(t[6])), ValueError,
         r"row_permutation: not a permutation of 0..63"),
        ("shape", lambda s: (64, 72), ValueError, r"shape: shape \(64, 72\) is not a whole number of blocks"),
        ("shape", lambda s: (64,), ValueError, r"shape: expected \(N, K\)"),
        ("block", lambda b: (16, 12), ValueError, r"block: expected \(bn, bk\)"),
    ],
)
def test_block_shuffled_constructor_rejects_each_bad_field(field, change, error, match):
    sparse, _, _ = block_weight(64, 64, (16, 16), density=0.6)
    arguments = block_fields(sparse)
    value = arguments[field]
    arguments[field] = change(value.clone() if isinstance(value, torch.Tensor) else value)
    with pytest.raises(error, match=match):
        BlockShuffledWeight(**arguments)
