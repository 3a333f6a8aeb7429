"""Magnitude pruning: the exact N:M top-n choice per V-group against a brute-force reference, unstructured (CSR)
pruning at an exact sparsity, block pruning that keeps the largest blocks, ties, and argument checks."""

from __future__ import annotations

import math
import random

import pytest
import torch

import nmspmm
from conftest import DEVICE
from nmspmm import NMSparseWeight, magnitude_mask, prune
from nmspmm.formats import SUPPORTED_DTYPES, SUPPORTED_VECTORS
from nmspmm.prune import kept_magnitude
from nmspmm.prune.block_shuffle import prune_block_shuffled, search_row_permutation, tile_magnitudes
from nmspmm.prune.unstructured import prune_csr, unstructured_mask

N, K = 128, 64
PATTERNS = [
    "1:4", "2:4", "3:4", "2:8", "4:8", "7:8", "3:16", "8:16", "15:16",
    "1:32", "16:32", "31:32", "5:64", "32:64", "63:64",
]  # fmt: skip


def reference_mask(weight: torch.Tensor, n: int, m: int, vector: int) -> torch.Tensor:
    """Brute force: per V-group and group of m, exactly-rounded sums of |w|, sorted by (-score, index)."""
    magnitudes = weight.double().abs().tolist()
    rows, cols = weight.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for first in range(0, rows, vector):
        for start in range(0, cols, m):
            scores = [math.fsum(magnitudes[r][start + i] for r in range(first, first + vector)) for i in range(m)]
            for i in sorted(range(m), key=lambda i: (-scores[i], i))[:n]:
                mask[first : first + vector, start + i] = True
    return mask


def nm_of(pattern: str) -> tuple[int, int]:
    n, m = pattern.split(":")
    return int(n), int(m)


def assert_vector_wise_nm(mask: torch.Tensor, n: int, m: int, vector: int) -> None:
    rows, cols = mask.shape
    groups = mask.view(rows // vector, vector, cols // m, m)
    assert bool((groups == groups[:, :1]).all()), "rows of a V-group differ"
    assert bool((groups.sum(-1) == n).all()), f"a group of {m} does not keep exactly {n}"


@pytest.mark.parametrize("vector", SUPPORTED_VECTORS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_mask_is_exact_top_n(pattern: str, vector: int) -> None:
    n, m = nm_of(pattern)
    for dtype in SUPPORTED_DTYPES:
        weight = torch.randn(N, K, dtype=dtype)
        mask = magnitude_mask(weight, pattern, vector)
        assert mask.dtype == torch.bool and mask.shape == (N, K)
        assert_vector_wise_nm(mask, n, m, vector)
        assert torch.equal(mask, reference_mask(weight, n, m, vector)), dtype


@pytest.mark.parametrize("vector", [1, 16])
@pytest.mark.parametrize("pattern", ["2:4", "3:8", "8:16", "24:32", "33:64"])
def test_ties_go_to_the_lower_index(pattern: str, vector: int) -> None:
    n, m = nm_of(pattern)
    # Small integers: many exact ties among the summed magnitudes.
    weight = torch.randint(-2, 3, (N, K)).to(torch.float16)
    mask = magnitude_mask(weight, pattern, vector)
    assert torch.equal(mask, reference_mask(weight, n, m, vector))
    assert torch.equal(mask, magnitude_mask(weight.clone(), pattern, vector))


@pytest.mark.parametrize("fill", [0.0, 1.0, -0.5])
@pytest.mark.parametrize("vector", [1, 128])
def test_equal_weights_keep_the_first_n(fill: float, vector: int) -> None:
    expected = torch.zeros(N, K, dtype=torch.bool)
    expected.view(N, K // 8, 8)[..., :3] = True
    for dtype in SUPPORTED_DTYPES:
        assert torch.equal(magnitude_mask(torch.full((N, K), fill, dtype=dtype), "3:8", vector), expected)


def test_bfloat16_scores_are_not_rounded_to_bfloat16() -> None:
    # Column 0 sums to 256, column 1 to 257; in bfloat16 both would be 256 and the tie would pick column 0.
    weight = torch.zeros(128, 4, dtype=torch.bfloat16)
    weight[:, 0] = 2.0
    first, second = random.sample(range(128), 2)
    weight[first, 1], weight[second, 1] = 256.0, -1.0
    assert magnitude_mask(weight, "1:4", 128)[0].tolist() == [False, True, False, False]


def test_float16_scores_are_summed_in_float64() -> None:
    # 2048 + 2**-24 (smallest float16) is 2048 in float32; only a float64 sum ranks column 1 first.
    weight = torch.zeros(16, 4, dtype=torch.float16)
    first, second = random.sample(range(16), 2)
    weight[random.randrange(16), 0] = 2048.0
    weight[first, 1], weight[second, 1] = 2048.0, 2.0**-24
    assert magnitude_mask(weight, "1:4", 16)[0].tolist() == [False, True, False, False]


@pytest.mark.parametrize(("pattern", "vector"), [("2:4", 1), ("5:8", 32), ("1:16", 128), ("60:64", 16)])
def test_prune_compresses_the_magnitude_mask(pattern: str, vector: int) -> None:
    for dtype in SUPPORTED_DTYPES:
        weight = torch.randn(N, K, dtype=dtype, requires_grad=True)
        sparse = prune(weight, pattern, vector)
        mask = magnitude_mask(weight, pattern, vector)
        assert isinstance(sparse, NMSparseWeight)
        assert (sparse.pattern, sparse.vector, sparse.shape, sparse.dtype) == (pattern, vector, (N, K), dtype)
        assert not sparse.values.requires_grad
        assert torch.equal(sparse.mask(), mask)
        assert torch.equal(sparse.to_dense(), (weight * mask).detach())


def test_non_contiguous_weight() -> None:
    weight = torch.randn(K, N, dtype=torch.bfloat16).t()
    assert torch.equal(magnitude_mask(weight, "4:16", 32), magnitude_mask(weight.contiguous(), "4:16", 32))
    assert torch.equal(prune(weight, "4:16", 32).to_dense(), prune(weight.contiguous(), "4:16", 32).to_dense())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("function", [magnitude_mask, prune])
def test_non_finite_weight_is_refused_naming_where(function, bad: float) -> None:
    weight = torch.randn(N, K, dtype=torch.bfloat16)
    row, col = random.randrange(N - 1), random.randrange(K)
    weight[row, col] = bad
    weight[row + 1 :, :] = float("nan")  # only the first one (row-major) is named
    with pytest.raises(ValueError, match=rf"weight: expected finite values, got {bad} at row {row}, column {col}$"):
        function(weight, "2:4", 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"weight": torch.ones(N, K, dtype=torch.int64)}, TypeError, r"weight: expected dtype .*got torch.int64"),
        ({"weight": torch.ones(N, K, dtype=torch.float64)}, TypeError, r"weight: expected dtype .*got torch.float64"),
        ({"weight": torch.ones(0, K)}, ValueError, r"weight: expected a non-empty matrix, got shape \(0, 64\)"),
        ({"weight": torch.ones(2, N, K)}, ValueError, r"weight: expected a 2-D .*got shape \(2, 128, 64\)"),
        ({"pattern": "2:24"}, ValueError, r"pattern: m must be one of .*got m=24"),
        ({"pattern": "3:7"}, ValueError, r"pattern: m must be one of .*got m=7"),
        ({"pattern": "4:4"}, ValueError, r"pattern: n must satisfy 1 <= n < m, got n=4, m=4"),
        ({"pattern": "0:4"}, ValueError, r"pattern: n must satisfy 1 <= n < m, got n=0, m=4"),
        ({"pattern": "8-32"}, ValueError, r"pattern: expected 'n:m'.*got '8-32'"),
        ({"pattern": 8}, TypeError, r"pattern: expected a string .*got int 8"),
        ({"pattern": "2:128"}, ValueError, r"pattern: m must be one of .*got m=128"),
        ({"vector": 8}, ValueError, r"vector: expected one of \(1, 16, 32, 64, 128\), got 8"),
        ({"vector": "16"}, TypeError, r"vector: expected an int .*got str '16'"),
        ({"weight": torch.ones(48, K), "vector": 32}, ValueError, r"vector: V=32 must divide out_features N=48"),
        ({"weight": torch.ones(N, 48), "pattern": "8:32"}, ValueError, r"weight: in_features K=48 .*m=32"),
    ],
)
@pytest.mark.parametrize("function", [magnitude_mask, prune])
def test_bad_arguments(function, kwargs: dict, error: type[Exception], message: str) -> None:
    arguments = {"weight": torch.randn(N, K), "pattern": "2:4", "vector": 16, **kwargs}
    with pytest.raises(error, match=message):
        function(**arguments)


def test_format_prune_methods_are_deprecated_names_of_the_pruning_functions():
    weight = torch.randn(64, 64, device=DEVICE)
    with pytest.warns(DeprecationWarning, match=r"CSRWeight.prune is deprecated; call nmspmm.prune.prune_csr"):
        old = nmspmm.CSRWeight.prune(weight, 0.75)
    new = nmspmm.prune.prune_csr(weight, 0.75)
    assert torch.equal(old.to_dense(), new.to_dense())
    with pytest.warns(DeprecationWarning, match=r"nmspmm.prune.prune_block_shuffled"):
        old = nmspmm.BlockShuffledWeight.prune(weight, 0.5, (32, 32), search=False)
    new = nmspmm.prune.prune_block_shuffled(weight, 0.5, (32, 32), search=False)
    assert torch.equal(old.to_dense(), new.to_dense())


def test_prune_is_both_the_package_and_its_n_m_entry_point():
    weight = torch.randn(32, 64, device=DEVICE)
    assert torch.equal(nmspmm.prune(weight, "2:4", 16).to_dense(), nmspmm.prune.prune(weight, "2:4", 16).to_dense())
    for name in ("wanda_mask", "collect_input_norms", "search_permutation", "prune_csr", "prune_block_shuffled"):
        assert callable(getattr(nmspmm.prune, name))


# ---- unstructured pruning (CSRWeight) -----------------------------------------------------------------------


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 0.9999])
def test_csr_prune_sparsity_is_exact_and_keeps_largest(sparsity):
    dense = torch.randn(45, 70, device=DEVICE)
    weight = prune_csr(dense, sparsity)
    assert weight.nnz == round((1 - sparsity) * 45 * 70)
    kept = weight.mask()
    if 0 < weight.nnz < dense.numel():
        assert dense.abs()[kept].min() >= dense.abs()[~kept].max()
    assert torch.equal(weight.to_dense(), torch.where(kept, dense, torch.zeros((), device=DEVICE)))


@pytest.mark.usefixtures("seeded")
def test_csr_prune_ties_are_deterministic_and_detached():
    dense = torch.ones(4, 5, device=DEVICE, requires_grad=True)
    mask = unstructured_mask(dense, 0.5)
    assert mask.flatten().tolist() == [True] * 10 + [False] * 10  # ties go to the earlier row-major entry
    weight = prune_csr(dense, 0.5)
    assert not weight.values.requires_grad


@pytest.mark.usefixtures("seeded")
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
def test_csr_prune_rejects_bad_sparsity(sparsity, error, message):
    with pytest.raises(error, match=message):
        prune_csr(torch.randn(4, 4, device=DEVICE), sparsity)


@pytest.mark.usefixtures("seeded")
def test_csr_prune_rejects_bad_weight():
    dense = torch.randn(4, 6, device=DEVICE)
    dense[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"weight: expected finite values, got nan at row 1, column 2"):
        unstructured_mask(dense, 0.5)
    with pytest.raises(TypeError, match=r"weight: expected dtype float16, bfloat16 or float32, got torch.int64"):
        unstructured_mask(torch.ones(4, 6, dtype=torch.long, device=DEVICE), 0.5)
    with pytest.raises(ValueError, match=r"weight: expected a non-empty matrix, got shape \(0, 6\)"):
        unstructured_mask(torch.ones(0, 6, device=DEVICE), 0.5)


# ---- block pruning (BlockShuffledWeight) --------------------------------------------------------------------


@pytest.mark.parametrize("rows,cols,block,sparsity", [(96, 128, (32, 32), 0.75), (48, 80, (16, 16), 0.5),
                                                      (128, 64, (64, 16), 0.3), (64, 64, (16, 16), 0.0),
                                                      (64, 64, (16, 16), 1.0)])
@pytest.mark.parametrize("search", [False, True])
def test_block_shuffled_prune_keeps_the_largest_blocks(rows, cols, block, sparsity, search):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
    sparse = prune_block_shuffled(weight, sparsity, block, search=search)
    total = rows // block[0] * (cols // block[1])
    assert sparse.block_count == round((1 - sparsity) * total)
    if not search:
        assert torch.equal(sparse.row_permutation, torch.arange(rows, dtype=torch.int32))
    magnitudes = tile_magnitudes(weight, block, sparse.row_permutation)
    kept = sparse.block_mask()
    if 0 < sparse.block_count < total:
        assert float(magnitudes[kept].min()) >= float(magnitudes[~kept].max())
    mask = sparse.mask()
    assert torch.equal(sparse.to_dense(), weight * mask)
    kept_sum = float(magnitudes[kept].sum()) / float(weight.abs().double().sum())
    assert kept_magnitude(weight, mask) == pytest.approx(kept_sum, rel=1e-12)


def test_block_shuffled_prune_breaks_ties_to_the_lower_block():
    weight = torch.ones(64, 64)
    sparse = prune_block_shuffled(weight, 0.75, (16, 16), search=False)
    assert sparse.block_mask().flatten().nonzero().flatten().tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda w: prune_block_shuffled(w, 1.5), ValueError, r"sparsity: expected a fraction in \[0, 1\]"),
        (lambda w: prune_block_shuffled(w, "75%"), TypeError, r"sparsity: expected a float"),
        (lambda w: prune_block_shuffled(w, 0.5, (32, 48)), ValueError, r"block: expected \(bn, bk\)"),
        (lambda w: prune_block_shuffled(w[:48], 0.5), ValueError, r"weight: shape \(48, 64\) is not a whole"),
        (lambda w: prune_block_shuffled(w.index_fill(1, torch.tensor([3]), float("inf")), 0.5), ValueError,
         r"weight: expected finite values, got inf at row 0, column 3"),
        (lambda w: prune_block_shuffled(w, 0.5, search=False, iterations=3), ValueError, r"iterations: only used"),
        (lambda w: prune_block_shuffled(w, 0.5, search=1), TypeError, r"search: expected a bool"),
        (lambda w: search_row_permutation(w, (32, 32), 0.5, iterations=-1), ValueError, r"iterations: expected a non"),
        (lambda w: search_row_permutation(w, (32, 32), 0.5, seed=None), TypeError, r"seed: expected an int"),
    ],
)
def test_block_shuffled_prune_rejects_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(64, 64))
