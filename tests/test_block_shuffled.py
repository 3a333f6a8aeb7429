"""Shuffled block-wise sparsity: the BlockShuffledWeight format and its checks, block pruning and the row
permutation search, saving, the Triton kernel against a float64 reference (outputs poisoned first), and the
custom op's gradients and torch.compile."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, TOLERANCE, relative_error
from nmspmm.formats.block_shuffled import BlockShuffledWeight
from nmspmm.kernels.block_sparse import BlockSparseConfig, block_sparse_matmul
from nmspmm.ops.block_shuffled import block_shuffled_linear, block_shuffled_linear_op
from nmspmm.prune import kept_magnitude
from nmspmm.prune.block_shuffle import kept_block_count, prune_block_shuffled, search_row_permutation, tile_magnitudes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["reference", "triton"] if DEVICE == "cpu" else ["auto"]


def block_mask(rows: int, cols: int, block: tuple[int, int], density: float, generator: torch.Generator,
               empty_block_rows: tuple[int, ...] = ()) -> torch.Tensor:
    """A random ``[N / bn, K / bk]`` block mask, with the given block-rows left empty."""
    kept = torch.rand(rows // block[0], cols // block[1], generator=generator) < density
    kept[list(empty_block_rows)] = False
    return kept


def make_weight(
    rows: int,
    cols: int,
    block: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    density: float = 0.4,
    empty_block_rows: tuple[int, ...] = (),
    seed: int = 0,
    device: str = "cpu",
) -> tuple[BlockShuffledWeight, torch.Tensor, torch.Tensor]:
    """A weight with a random block mask and row permutation: (sparse, dense original, element mask)."""
    generator = torch.Generator().manual_seed(seed)
    kept = block_mask(rows, cols, block, density, generator, empty_block_rows)
    permutation = torch.randperm(rows, generator=generator)
    permuted_mask = kept.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    mask = torch.empty_like(permuted_mask)
    mask[permutation] = permuted_mask
    dense = torch.randn(rows, cols, generator=generator).to(dtype)
    sparse = BlockShuffledWeight.from_dense(dense.to(device), mask.to(device), block, permutation.to(device))
    return sparse, dense, mask


def kept_tiles(matrix: torch.Tensor, weight: BlockShuffledWeight) -> torch.Tensor:
    """``[nblocks, bn, bk]``: the tiles of ``matrix[row_permutation]`` at the weight's kept blocks, in storage order."""
    (bn, bk), (rows, cols) = weight.block, matrix.shape
    tiles = matrix[weight.row_permutation.long()].reshape(rows // bn, bn, cols // bk, bk).transpose(1, 2)
    return tiles[weight.block_mask()]


def fields(weight: BlockShuffledWeight) -> dict:
    """The constructor's arguments, by name."""
    return {**weight.state_tensors(), "shape": tuple(weight.shape), "block": weight.block}


# ---- format ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows,cols,block", [(96, 128, (32, 32)), (48, 80, (16, 16)), (128, 32, (64, 16)), (128, 256, (128, 128))]
)
def test_round_trip(rows, cols, block, dtype):
    sparse, dense, mask = make_weight(rows, cols, block, dtype, empty_block_rows=(0,))
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


def test_from_dense_identity_permutation_strided_weight_and_integer_mask():
    generator = torch.Generator().manual_seed(1)
    kept = block_mask(64, 96, (32, 16), 0.5, generator)
    mask = kept.repeat_interleave(32, 0).repeat_interleave(16, 1)
    weight = torch.randn(96, 64, generator=generator).t()
    sparse = BlockShuffledWeight.from_dense(weight, mask.int(), (32, 16))
    assert torch.equal(sparse.row_permutation, torch.arange(64, dtype=torch.int32))
    assert torch.equal(sparse.to_dense(), weight * mask)
    assert torch.equal(sparse.block_mask(), kept)


def test_pruned_entries_may_be_non_finite():
    sparse, dense, mask = make_weight(64, 64, (16, 16))
    poisoned = dense.masked_fill(~mask, float("nan"))
    again = BlockShuffledWeight.from_dense(poisoned, mask, (16, 16), sparse.row_permutation)
    assert torch.equal(again.to_dense(), sparse.to_dense())


def test_all_pruned_and_all_kept():
    weight = torch.randn(32, 64)
    empty = BlockShuffledWeight.from_dense(weight, torch.zeros(32, 64, dtype=torch.bool), (16, 32))
    assert empty.values.shape == (0, 16, 32) and not bool(empty.to_dense().any()) and empty.density == 0
    full = BlockShuffledWeight.from_dense(weight, torch.ones(32, 64, dtype=torch.bool), (16, 32))
    assert torch.equal(full.to_dense(), weight) and full.density == 1


def test_nbytes_repr_and_to():
    sparse, _, _ = make_weight(64, 128, (32, 32), torch.float16, density=0.5)
    tensors = sparse.state_tensors().values()
    assert sparse.nbytes == sum(t.numel() * t.element_size() for t in tensors) + 32
    assert "BlockShuffledWeight(shape=(64, 128), block=(32, 32)" in repr(sparse)
    widened = sparse.to(torch.float32)
    assert widened.dtype == torch.float32 and widened.row_permutation.dtype == torch.int32
    assert torch.equal(widened.to_dense(), sparse.to_dense().float())
    assert sparse.cpu().device.type == "cpu"


def test_from_dense_rejects_a_mixed_block():
    sparse, dense, mask = make_weight(64, 64, (16, 16), density=0.5)
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
def test_from_dense_rejects_bad_arguments(weight, mask, block, permutation, error, match):
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
def test_constructor_rejects_each_bad_field(field, change, error, match):
    sparse, _, _ = make_weight(64, 64, (16, 16), density=0.6)
    arguments = fields(sparse)
    value = arguments[field]
    arguments[field] = change(value.clone() if isinstance(value, torch.Tensor) else value)
    with pytest.raises(error, match=match):
        BlockShuffledWeight(**arguments)


# ---- pruning and the permutation search ---------------------------------------------------------------------------


@pytest.mark.parametrize("rows,cols,block,sparsity", [(96, 128, (32, 32), 0.75), (48, 80, (16, 16), 0.5),
                                                      (128, 64, (64, 16), 0.3), (64, 64, (16, 16), 0.0),
                                                      (64, 64, (16, 16), 1.0)])
@pytest.mark.parametrize("search", [False, True])
def test_prune_keeps_the_largest_blocks(rows, cols, block, sparsity, search):
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


def test_prune_breaks_ties_to_the_lower_block():
    weight = torch.ones(64, 64)
    sparse = prune_block_shuffled(weight, 0.75, (16, 16), search=False)
    assert sparse.block_mask().flatten().nonzero().flatten().tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("block", [(16, 16), (32, 16)])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_search_is_never_worse_than_the_identity(block, sparsity):
    weight = torch.randn(128, 128, generator=torch.Generator().manual_seed(3))
    permutation = search_row_permutation(weight, block, sparsity)
    assert permutation.dtype == torch.int64 and sorted(permutation.tolist()) == list(range(128))
    keep = kept_block_count(128 // block[0], 128 // block[1], sparsity)

    def kept(perm: torch.Tensor) -> float:
        return float(tile_magnitudes(weight, block, perm).flatten().topk(keep).values.sum())

    assert kept(permutation) >= kept(torch.arange(128))
    assert torch.equal(permutation, search_row_permutation(weight, block, sparsity))


def planted_rows(rows: int, cols: int, block: tuple[int, int], seed: int) -> torch.Tensor:
    """Rows of two interleaved families (even and odd rows), each large on its own half of the column-blocks."""
    generator = torch.Generator().manual_seed(seed)
    blocks = cols // block[1]
    family_support = torch.zeros(2, blocks, dtype=torch.bool)
    family_support[0, torch.randperm(blocks, generator=generator)[: blocks // 2]] = True
    family_support[1] = ~family_support[0]
    scale = 1 + 9 * family_support[torch.arange(rows) % 2].repeat_interleave(block[1], 1).float()
    return torch.randn(rows, cols, generator=generator) * scale


def test_search_recovers_planted_row_families():
    block = (16, 16)
    weight = planted_rows(128, 128, block, seed=4)
    identity = prune_block_shuffled(weight, 0.5, block, search=False)
    searched = prune_block_shuffled(weight, 0.5, block)
    before, after = kept_magnitude(weight, identity.mask()), kept_magnitude(weight, searched.mask())
    assert after > before + 0.3
    families = searched.row_permutation.long().view(-1, block[0]) % 2
    assert bool((families == families[:, :1]).all())  # every block-row holds one family


def test_search_is_better_on_gaussian_weights_and_handles_trivial_cases():
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(5))
    identity = prune_block_shuffled(weight, 0.75, (16, 32), search=False)
    searched = prune_block_shuffled(weight, 0.75, (16, 32), iterations=8)
    assert kept_magnitude(weight, searched.mask()) > kept_magnitude(weight, identity.mask())
    for sparsity, block in [(0.0, (16, 16)), (1.0, (16, 16)), (0.5, (128, 16))]:
        assert torch.equal(search_row_permutation(weight, block, sparsity), torch.arange(128))
    halving_only = search_row_permutation(weight, (16, 32), 0.75, iterations=0)
    assert sorted(halving_only.tolist()) == list(range(128))


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
def test_prune_rejects_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(64, 64))


# ---- saving ----------------------------------------------------------------------------------------------------------


def test_state_round_trip_and_checks():
    sparse, _, _ = make_weight(64, 96, (32, 16), torch.bfloat16)
    again = BlockShuffledWeight.from_state(sparse.state_tensors(), sparse.state_fields())
    assert sparse.state_fields() == {"shape": [64, 96], "dtype": "bfloat16", "block": [32, 16]}
    assert torch.equal(again.to_dense(), sparse.to_dense()) and again.block == (32, 16)
    tensors, state = sparse.state_tensors(), sparse.state_fields()
    with pytest.raises(ValueError, match=r"tensors: expected the fields"):
        BlockShuffledWeight.from_state({k: v for k, v in tensors.items() if k != "row_permutation"}, state)
    with pytest.raises(ValueError, match=r"fields: dtype 'float16' does not match values of torch.bfloat16"):
        BlockShuffledWeight.from_state(tensors, {**state, "dtype": "float16"})
    with pytest.raises(ValueError, match=r"fields: expected the fields"):
        BlockShuffledWeight.from_state(tensors, {**state, "vector": 1})
    with pytest.raises(ValueError, match=r"row_permutation: not a permutation"):
        BlockShuffledWeight.from_state({**tensors, "row_permutation": torch.zeros(64, dtype=torch.int32)}, state)


def test_torch_save_load_weights_only(tmp_path: Path):
    sparse, _, _ = make_weight(64, 64, (16, 32), torch.float16)
    torch.save({"layer": sparse}, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", weights_only=True)["layer"]
    assert isinstance(loaded, BlockShuffledWeight) and loaded.block == (16, 32)
    for name, tensor in sparse.state_tensors().items():
        assert torch.equal(getattr(loaded, name), tensor)
    assert torch.equal(pickle.loads(pickle.dumps(sparse)).to_dense(), sparse.to_dense())


def _rewrite_zip_entry(path: Path, old: bytes, new: bytes) -> None:
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    assert sum(data == old for _, data in entries) == 1
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, data in entries:
            archive.writestr(info, new if data == old else data)


@pytest.mark.parametrize(
    "field,tamper,match",
    [
        ("row_permutation", lambda t: t.roll(1).index_fill_(0, torch.tensor([0]), 3), r"row_permutation: not a perm"),
        ("block_columns", lambda t: t.flip(0), r"block_columns: must be strictly ascending"),
        ("block_row_offsets", lambda t: t.flip(0), r"block_row_offsets: expected to run from 0"),
    ],
)
def test_torch_load_refuses_tampered_indices(tmp_path: Path, field, tamper, match):
    sparse, _, _ = make_weight(64, 64, (16, 16), density=0.8, seed=2)
    path = tmp_path / "w.pt"
    torch.save(sparse, path)
    original = getattr(sparse, field)
    _rewrite_zip_entry(path, original.numpy().tobytes(), tamper(original.clone()).contiguous().numpy().tobytes())
    with pytest.raises(ValueError, match=match):
        torch.load(path, weights_only=True)


def test_torch_load_refuses_an_instance_built_without_the_constructor(tmp_path: Path):
    path = tmp_path / "w.pt"
    torch.save(make_weight(32, 32, (16, 16))[0], path)
    with zipfile.ZipFile(path) as archive:
        pickled = next(archive.read(name) for name in archive.namelist() if name.endswith("data.pkl"))
    _rewrite_zip_entry(path, pickled, b"\x80\x02cnmspmm.formats.block_shuffled\nBlockShuffledWeight\n)\x81.")
    with pytest.raises(pickle.UnpicklingError, match="BlockShuffledWeight"):
        torch.load(path)


# ---- the kernel and the product ----------------------------------------------------------------------------------


def _reference(x: torch.Tensor, sparse: BlockShuffledWeight, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ sparse.to_dense().double().t()
    return y if bias is None else y + bias.double()


def _launch(x: torch.Tensor, sparse: BlockShuffledWeight, out: torch.Tensor, bias: torch.Tensor | None,
            precision: str = "ieee") -> None:
    block_sparse_matmul(
        x, sparse.values, sparse.block_columns, sparse.block_row_offsets, sparse.block_row_order,
        sparse.row_permutation, out, bias, precision,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,rows,cols,block,empty",
    [(1, 64, 64, (32, 32), (1,)), (7, 48, 80, (16, 16), (0, 2)), (33, 128, 32, (64, 16), ())],
)
def test_kernel_matches_reference(tokens, rows, cols, block, empty, dtype):
    sparse, _, _ = make_weight(rows, cols, block, dtype, density=0.5, empty_block_rows=empty, seed=tokens,
                               device=DEVICE)
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype)
    bias = torch.randn(rows, device=DEVICE).to(dtype)
    out = torch.full((tokens, rows), float("nan"), dtype=dtype, device=DEVICE)
    _launch(x, sparse, out, bias)
    assert relative_error(out, _reference(x, sparse, bias)) < TOLERANCE[dtype]


def test_kernel_all_empty_strided_operands_and_tf32():
    sparse, _, _ = make_weight(32, 64, (16, 16), density=0.0, device=DEVICE)
    x = torch.randn(5, 64, device=DEVICE)
    bias = torch.randn(32, device=DEVICE)
    out = torch.full((32, 5), float("nan"), device=DEVICE).t()  # [5, 32] with column-major strides
    _launch(x, sparse, out, None)
    assert torch.equal(out, torch.zeros(5, 32, device=DEVICE))
    _launch(x, sparse, out, bias)
    assert torch.equal(out, bias.expand(5, 32))
    sparse, _, _ = make_weight(64, 64, (16, 32), density=0.7, device=DEVICE)
    x = torch.randn(64, 9, device=DEVICE).t()  # the features of a token are strided
    out = torch.full((64, 9), float("nan"), device=DEVICE).t()
    _launch(x, sparse, out, bias.repeat(2))
    assert relative_error(out, _reference(x, sparse, bias.repeat(2))) < TOLERANCE[torch.float32]
    out.fill_(float("nan"))
    _launch(x, sparse, out, None, "tf32")
    assert relative_error(out, _reference(x, sparse, None)) < TOLERANCE["tf32"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [2, 3])
def test_kernel_split_over_blocks_sums_every_share(dtype, split_k):
    # Block-rows of 0 to 5 blocks split three ways leave some programs without blocks: their slices must be zeros.
    sparse, _, _ = make_weight(64, 80, (16, 16), dtype, density=0.6, empty_block_rows=(2,), seed=split_k,
                               device=DEVICE)
    x = torch.randn(7, 80, device=DEVICE).to(dtype)
    bias = torch.randn(64, device=DEVICE).to(dtype)
    config = BlockSparseConfig(block_m=16, num_warps=4, num_stages=1, split_k=split_k)
    for with_bias in (None, bias):
        out = torch.full((64, 7), float("nan"), dtype=dtype, device=DEVICE).t()
        block_sparse_matmul(
            x, sparse.values, sparse.block_columns, sparse.block_row_offsets, sparse.block_row_order,
            sparse.row_permutation, out, with_bias, config=config,
        )
        assert relative_error(out, _reference(x, sparse, with_bias)) < TOLERANCE[dtype]


def test_few_tokens_split_long_block_rows_in_two(monkeypatch):
    import nmspmm.kernels.block_sparse as block_sparse

    monkeypatch.setattr(block_sparse, "interpreter_active", lambda: False)

    def split(tokens, rows, kept_blocks, block=(32, 32)):
        return block_sparse.choose_block_sparse_config(tokens, block, torch.bfloat16, rows, kept_blocks).split_k

    blocks_4096 = (4096 // 32) ** 2
    assert split(16, 4096, blocks_4096 // 2) == 2  # 50%: 64 blocks a block-row
    assert split(16, 4096, blocks_4096 // 4) == 1  # 75%: 32
    assert split(1024, 4096, blocks_4096 // 2) == 1  # many tokens: enough token tiles


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_matches_reference(dtype, backend):
    sparse, _, _ = make_weight(48, 80, (16, 16), dtype, density=0.5, empty_block_rows=(1,), device=DEVICE)
    x = torch.randn(2, 3, 80, device=DEVICE).to(dtype)
    bias = torch.randn(48, device=DEVICE).to(dtype)
    y = block_shuffled_linear(x, sparse, bias, backend=backend)
    assert y.shape == (2, 3, 48) and y.dtype == dtype and y.is_contiguous()
    assert relative_error(y, _reference(x, sparse, bias)) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [(32, 32), (64, 16), (16, 16)])
@pytest.mark.parametrize("rows,cols", [(4096, 4096), (11008, 4096)])
@pytest.mark.parametrize("tokens", [1, 16, 256, 1024])
def test_kernel_large_shapes(tokens, rows, cols, block, dtype):
    sparse, _, _ = make_weight(rows, cols, block, dtype, density=0.25, empty_block_rows=(3,), seed=tokens,
                               device="cuda")
    x = torch.randn(tokens, cols, device="cuda").to(dtype)
    bias = torch.randn(rows, device="cuda").to(dtype)
    out = torch.full((tokens, rows), float("nan"), dtype=dtype, device="cuda")
    _launch(x, sparse, out, bias)
    assert relative_error(out, _reference(x, sparse, bias)) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bn", [16, 32, 64, 128])
@pytest.mark.parametrize("bk", [16, 32, 64, 128])
def test_kernel_every_block_shape(bn, bk, dtype):
    sparse, _, _ = make_weight(512, 1024, (bn, bk), dtype, density=0.3, empty_block_rows=(1,), device="cuda")
    x = torch.randn(300, 1024, device="cuda").to(dtype)
    out = torch.full((300, 512), float("nan"), dtype=dtype, device="cuda")
    _launch(x, sparse, out, None)
    assert relative_error(out, _reference(x, sparse, None)) < TOLERANCE[dtype]


@pytest.mark.gpu
def test_prune_and_product_on_gpu():
    weight = torch.randn(1024, 512, device="cuda")
    sparse = prune_block_shuffled(weight, 0.75, (32, 32))
    assert sparse.device.type == "cuda"
    x = torch.randn(77, 512, device="cuda")
    assert relative_error(block_shuffled_linear(x, sparse), _reference(x, sparse, None)) < TOLERANCE["tf32"]


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda w: (torch.randn(4, 64).half(), w, None), TypeError, r"x: dtype torch.float16 does not match"),
        (lambda w: (torch.randn(4, 48), w, None), ValueError, r"x: expected last dimension K=64"),
        (lambda w: ([[1.0] * 64], w, None), TypeError, r"x: expected a torch.Tensor"),
        (lambda w: (torch.randn(4, 64), w.to_dense(), None), TypeError, r"weight: expected an nmspmm.BlockShuffled"),
        (lambda w: (torch.randn(4, 64), w, torch.randn(31)), ValueError, r"bias: expected shape \(32,\)"),
        (lambda w: (torch.randn(4, 64), w, torch.randn(32).half()), TypeError, r"bias: dtype torch.float16"),
        (lambda w: (torch.randn(4, 64, device="meta"), w, None), ValueError, r"x: on meta, but weight is on cpu"),
    ],
)
def test_linear_rejects_bad_input(make_args, error, match):
    sparse, _, _ = make_weight(32, 64, (16, 16))
    x, weight, bias = make_args(sparse)
    with pytest.raises(error, match=match):
        block_shuffled_linear(x, weight, bias)
    with pytest.raises(ValueError, match="backend: expected one of"):
        block_shuffled_linear(torch.randn(2, 64), sparse, backend="cublas")


# ---- autograd and torch.compile ------------------------------------------------------------------------------------


def _op_args(sparse: BlockShuffledWeight, x: torch.Tensor, values: torch.Tensor, bias, backend: str) -> tuple:
    return (x, values, sparse.block_columns, sparse.block_row_offsets, sparse.block_row_order,
            sparse.row_permutation, bias, backend)


def test_gradcheck_reference_float64():
    sparse, _, _ = make_weight(32, 48, (16, 16), density=0.5)
    x = torch.randn(5, 48, dtype=torch.float64, requires_grad=True)
    values = sparse.values.double().requires_grad_()
    bias = torch.randn(32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, v, b: block_shuffled_linear_op(*_op_args(sparse, x, v, b, "reference")), (x, values, bias)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_dense_masked(dtype, backend):
    rows, cols, tokens, block = 64, 48, 9, (32, 16)
    sparse, _, _ = make_weight(rows, cols, block, dtype, density=0.5, device=DEVICE)
    x = torch.randn(tokens, cols, device=DEVICE).to(dtype).requires_grad_()
    values = sparse.values.clone().requires_grad_()
    bias = torch.randn(rows, device=DEVICE).to(dtype).requires_grad_()
    grad_y = torch.randn(tokens, rows, device=DEVICE).to(dtype)
    trainable = BlockShuffledWeight._trusted(
        values, sparse.block_columns, sparse.block_row_offsets, sparse.row_permutation, sparse.shape, block
    )
    block_shuffled_linear(x, trainable, bias, backend=backend).backward(grad_y)

    dense = sparse.to_dense().double().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    (x_ref @ dense.t()).backward(grad_y.double())
    expected_values = kept_tiles(dense.grad, sparse)
    assert relative_error(x.grad, x_ref.grad) < TOLERANCE[dtype]
    assert relative_error(values.grad, expected_values) < TOLERANCE[dtype]
    assert relative_error(bias.grad, grad_y.double().sum(0)) < TOLERANCE[dtype]


def test_opcheck():
    sparse, _, _ = make_weight(32, 48, (16, 16), density=0.5, device=DEVICE)
    x = torch.randn(3, 48, device=DEVICE)
    for bias in (None, torch.randn(32, device=DEVICE)):
        torch.library.opcheck(block_shuffled_linear_op, _op_args(sparse, x, sparse.values, bias, BACKENDS[-1]))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    sparse, _, _ = make_weight(32, 64, (16, 32), density=0.5, device=DEVICE)
    bias = torch.randn(32, device=DEVICE)

    def layer(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(block_shuffled_linear(x, sparse, bias))

    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    for shape in [(5, 64), (2, 7, 64)]:
        x = torch.randn(shape, device=DEVICE, requires_grad=backend == "aot_eager")
        y = compiled(x)
        assert relative_error(y.detach(), layer(x).detach()) < TOLERANCE[torch.float32]
        if x.requires_grad:
            y.sum().backward()
            assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    torch._dynamo.reset()
