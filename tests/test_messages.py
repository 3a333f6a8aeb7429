"""Bad input gets a clear error naming the argument, where it used to get a raw error from int(), torch.Size or
safetensors (issue 15, point 5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmspmm
from nmspmm.formats import parse_pattern


@pytest.mark.parametrize(
    "pattern,match",
    [
        (
            "\u00b2:4",
            r"pattern: expected 'n:m' with two positive integers \(ASCII digits\), like '8:32', got '\u00b2:4'",
        ),
        ("1" * 5000 + ":4", r"got '1{40}\.\.\. \(5002 characters\)'"),
        ("8:32:1", r"pattern: expected 'n:m'"),
    ],
)
def test_pattern_strings_that_are_not_n_m(pattern, match):
    with pytest.raises(ValueError, match=match):
        parse_pattern(pattern)


def test_pattern_with_spaces_still_parses():
    assert parse_pattern(" 8 : 32 ") == (8, 32)


@pytest.mark.parametrize(
    "build",
    [
        lambda shape: nmspmm.NMSparseWeight(
            torch.randn(32, 32), torch.zeros(2, 16, 2, dtype=torch.uint8), "2:4", 16, shape
        ),
        lambda shape: nmspmm.CSRWeight(torch.randn(4), torch.zeros(4, dtype=torch.int32),
                                       torch.zeros(33, dtype=torch.int32), shape),
        lambda shape: nmspmm.BlockShuffledWeight(
            torch.randn(1, 32, 32), torch.zeros(1, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
            torch.arange(32, dtype=torch.int32), shape, (32, 32),
        ),
    ],
    ids=["nm", "csr", "block"],
)
def test_shape_of_floats_names_shape(build):
    with pytest.raises(TypeError, match=r"shape: expected \(N, K\) as two ints, got \(32\.0, 64\.0\)"):
        build((32.0, 64.0))


def test_sparsify_names_what_its_pattern_should_be():
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"pattern: expected 'csr' \(lower case\), got 'CSR'"):
        nmspmm.sparsify(model, "CSR", sparsity=0.5)
    with pytest.raises(ValueError, match=r"got '8-32'; or 'csr', 'bitmap' or 'block' for the other formats"):
        nmspmm.sparsify(model, "8-32")
    with pytest.raises(TypeError, match=r"calibration: expected an iterable of input batches, got int"):
        nmspmm.sparsify(model, "2:4", 16, method="wanda", calibration=5)
    assert type(model[0]) is nn.Linear


def test_file_paths_that_cannot_be_written_or_read(tmp_path):
    weight = nmspmm.prune(torch.randn(32, 64), "2:4", 16)
    model = nn.Sequential(nn.Linear(64, 64))
    missing = tmp_path / "missing" / "w.safetensors"
    for save in (lambda path: nmspmm.save_safetensors(weight, path), lambda path: nmspmm.save_pretrained(model, path)):
        with pytest.raises(IsADirectoryError, match=rf"path: '{tmp_path}' is a directory; expected a file path"):
            save(tmp_path)
        with pytest.raises(FileNotFoundError, match=r"path: the directory '.*missing' of '.*w.safetensors' does not"):
            save(missing)
    for load in (nmspmm.load_safetensors, lambda path: nmspmm.load_pretrained(model, path)):
        with pytest.raises(IsADirectoryError, match=rf"path: '{tmp_path}' is a directory; expected a safetensors"):
            load(tmp_path)
        with pytest.raises(FileNotFoundError, match=r"path: '.*w.safetensors' does not exist"):
            load(missing)
        with pytest.raises(TypeError, match=r"path: expected a str or os.PathLike, got int"):
            load(5)


def test_shapes_beyond_int32_indices_are_refused():
    # A K of 2**32 + 64 compared in int32 wrapped to 64; a K of 2**40 asked to_dense() for 140 TB.
    with pytest.raises(ValueError, match=r"shape: N and K must be at most 2147483647 \(int32 indices"):
        nmspmm.CSRWeight(torch.randn(2), torch.tensor([0, 5], dtype=torch.int32),
                         torch.tensor([0] * 32 + [2], dtype=torch.int32), (32, 2**32 + 64))
    with pytest.raises(ValueError, match=r"shape: N and K must be at most 2147483647"):
        nmspmm.BlockShuffledWeight(
            torch.randn(1, 32, 32), torch.zeros(1, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
            torch.arange(32, dtype=torch.int32), (32, 2**40), (32, 32),
        )


def test_csr_columns_are_compared_with_k_in_int64():
    # K = 2**31 - 1 is allowed; a column just below it is valid and one at it is not, however int32 would wrap.
    valid = nmspmm.CSRWeight(torch.randn(1), torch.tensor([2**31 - 2], dtype=torch.int32),
                             torch.tensor([0, 1], dtype=torch.int32), (1, 2**31 - 1))
    assert valid.nnz == 1
    with pytest.raises(ValueError, match=r"col_indices: expected values in \[0, K=2147483647\), got 2147483647"):
        nmspmm.CSRWeight(torch.randn(1), torch.tensor([2**31 - 1], dtype=torch.int32),
                         torch.tensor([0, 1], dtype=torch.int32), (1, 2**31 - 1))
