"""NMSparseWeight: compression round trips, storage size, and every argument check of the format."""

from __future__ import annotations

import pytest
import torch

from nmspmm import NMSparseWeight
from nmspmm.formats import SUPPORTED_DTYPES, SUPPORTED_M, SUPPORTED_VECTORS

N, K = 128, 64
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
