"""Test set-up: without a GPU, Triton kernels run under the CPU interpreter (set before triton loads); the
tolerances and helpers that several test files share (weights of each format, the float64 reference product)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative Frobenius-norm error allowed against a float64 reference.
TOLERANCE = {torch.float32: 1e-5, "tf32": 2e-3, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere gives inf."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    if not bool(torch.isfinite(actual).all()):
        return float("inf")
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def rewrite_zip_entry(path: Path, old: bytes, new: bytes) -> None:
    """Replace the one entry of a torch.save archive whose content is ``old`` (CRCs recomputed by zipfile)."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    assert sum(data == old for _, data in entries) == 1
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, data in entries:
            archive.writestr(info, new if data == old else data)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- shared helpers of the CSR and block-shuffled tests ------------------------------------------------------

from nmspmm.formats.block_shuffled import BlockShuffledWeight  # noqa: E402
from nmspmm.formats.bitmap import BitmapWeight  # noqa: E402
from nmspmm.formats.csr import CSRWeight  # noqa: E402
from nmspmm.kernels.sddmm import CELL  # noqa: E402


@pytest.fixture
def seeded() -> None:
    """torch.manual_seed(0) before the test (the CSR tests draw their weights from the global generator)."""
    torch.manual_seed(0)


def dense_reference(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + bias in float64, W the weight's dense matrix (any format with to_dense)."""
    y = x.double() @ weight.to_dense().double().t()
    return y + bias.double() if bias is not None else y


def csr_mask(rows: int, cols: int, density: float = 0.2) -> torch.Tensor:
    """A random mask with empty rows (every fifth) and one full row (several chunks of nonzeros)."""
    mask = torch.rand(rows, cols, device=DEVICE) < density
    mask[::5] = False
    mask[min(1, rows - 1)] = True
    return mask


def csr_weight(rows: int, cols: int, dtype: torch.dtype = torch.float32, density: float = 0.2) -> CSRWeight:
    return CSRWeight.from_dense(torch.randn(rows, cols, device=DEVICE).to(dtype), csr_mask(rows, cols, density))


def bitmap_weight(rows: int, cols: int, dtype: torch.dtype = torch.float32, density: float = 0.4) -> BitmapWeight:
    """An unstructured bitmap weight of a uniform random mask of ``density``."""
    dense = torch.randn(rows, cols, device=DEVICE).to(dtype)
    return BitmapWeight.from_dense(dense, torch.rand(rows, cols, device=DEVICE) < density)


def csr_op_args(weight: CSRWeight, x: torch.Tensor, bias: torch.Tensor | None, backend: str) -> tuple:
    """All the CSR custom op's arguments, backward structures included."""
    transposed = weight.transposed_structure()
    return (
        x, weight.values, weight.col_indices, weight.row_offsets, weight.row_order(), bias,
        weight.row_indices(), weight.tile_offsets(CELL), *transposed[:2], transposed.permutation,
        transposed.row_order, backend,
    )  # fmt: skip


def block_mask(rows: int, cols: int, block: tuple[int, int], density: float, generator: torch.Generator,
               empty_block_rows: tuple[int, ...] = ()) -> torch.Tensor:
    """A random ``[N / bn, K / bk]`` block mask, with the given block-rows left empty."""
    kept = torch.rand(rows // block[0], cols // block[1], generator=generator) < density
    kept[list(empty_block_rows)] = False
    return kept


def block_weight(
    rows: int,
    cols: int,
    block: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    density: float = 0.4,
    empty_block_rows: tuple[int, ...] = (),
    seed: int = 0,
    device: str = "cpu",
) -> tuple[BlockShuffledWeight, torch.Tensor, torch.Tensor]:
    """A block-shuffled weight with a random block mask and row permutation: (sparse, dense original, element
    mask)."""
    generator = torch.Generator().manual_seed(seed)
    kept = block_mask(rows, cols, block, density, generator, empty_block_rows)
    permutation = torch.randperm(rows, generator=generator)
    permuted_mask = kept.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    mask = torch.empty_like(permuted_mask)
    mask[permutation] = permuted_mask
    dense = torch.randn(rows, cols, generator=generator).to(dtype)
    sparse = BlockShuffledWeight.from_dense(dense.to(device), mask.to(device), block, permutation.to(device))
    return sparse, dense, mask


def block_op_args(sparse: BlockShuffledWeight, x: torch.Tensor, values: torch.Tensor, bias, backend: str) -> tuple:
    """The block-shuffled custom op's arguments, with the given x, values and bias."""
    return (x, values, sparse.block_columns, sparse.block_row_offsets, sparse.block_row_order,
            sparse.row_permutation, bias, backend)
