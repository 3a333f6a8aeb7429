"""Shuffled block-wise sparse weights (after Shfl-BW): after a permutation of the output features (rows), the
weight is block-sparse with dense ``(bn, bk)`` blocks, so every kept block is a tensor-core tile. Which rows
share a block-row is free, since a product's output features can be written back in any order; choosing
rows with similar magnitude profiles lets the kept blocks hold more of the weight than plain block sparsity."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import SparseWeightBase, deprecated_prune
from .pattern import SUPPORTED_DTYPES, check_shape, check_values, checked_mask, holds_values

# Block sides: tl.dot needs every operand dimension >= 16, and larger tiles stop fitting in registers.
SUPPORTED_BLOCK_SIDES = (16, 32, 64, 128)
INDEX_DTYPE = torch.int32
_STATE_FIELDS = {"shape", "dtype", "block"}
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check_block(block: tuple[int, int]) -> tuple[int, int]:
    """Validate a block shape ``(bn, bk)`` (output features x input features) and return it as a tuple."""
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise TypeError(f"block: expected a pair (bn, bk), got {type(block).__name__} {block!r}")
    if any(isinstance(side, bool) or not isinstance(side, int) for side in block):
        raise TypeError(f"block: expected two ints, got {block!r}")
    if any(side not in SUPPORTED_BLOCK_SIDES for side in block):
        raise ValueError(f"block: expected (bn, bk) with bn, bk in {SUPPORTED_BLOCK_SIDES}, got {tuple(block)}")
    return int(block[0]), int(block[1])


def check_block_weight(weight: torch.Tensor, block: tuple[int, int], name: str = "weight") -> None:
    """Check that ``weight`` is a non-empty 2-D float matrix whose shape is a whole number of ``block`` tiles."""
    bn, bk = check_block(block)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {weight.dtype}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(
            f"{name}: expected a non-empty 2-D [out_features, in_features] matrix, got shape {tuple(weight.shape)}"
        )
    _check_divisible(weight.shape, (bn, bk), name)


def _check_divisible(shape: tuple[int, ...], block: tuple[int, int], name: str) -> None:
    rows, cols = shape
    if rows % block[0] or cols % block[1]:
        raise ValueError(
            f"{name}: shape {tuple(shape)} is not a whole number of blocks: block {block} needs "
            f"N % {block[0]} == 0 and K % {block[1]} == 0"
        )


class BlockShuffledWeight(SparseWeightBase):
    """A pruned ``[N, K]`` weight that is block-sparse after a permutation of its rows.

    Permuted row i is original row ``row_permutation[i]``; the permuted weight ``W[row_permutation]`` is stored
    in block-CSR form with blocks ``block = (bn, bk)``:

    * ``values``: ``[nblocks, bn, bk]``, the dense contents of the kept blocks (zeros allowed inside);
    * ``block_columns``: int32 ``[nblocks]``, each block's block-column, strictly ascending within a block-row;
    * ``block_row_offsets``: int32 ``[N / bn + 1]``, block-row r holds blocks ``offsets[r]:offsets[r + 1]``;
    * ``row_permutation``: int32 ``[N]``, a permutation of ``0..N-1``.

    ``block_row_order`` (block-rows by descending block count, ties by index) is derived once: launching the
    heaviest block-rows first balances the GPU's work.
    """

    def __init__(
        self,
        values: torch.Tensor,
        block_columns: torch.Tensor,
        block_row_offsets: torch.Tensor,
        row_permutation: torch.Tensor,
        shape: tuple[int, int] | torch.Size,
        block: tuple[int, int],
        *,
        allow_nonfinite: bool = False,
    ) -> None:
        self._assign(values, block_columns, block_row_offsets, row_permutation, shape, block)
        self.validate()
        self.check_storage(allow_nonfinite)
        self.block_row_order = descending_block_count_order(block_row_offsets)

    @classmethod
    def _trusted(
        cls,
        values: torch.Tensor,
        block_columns: torch.Tensor,
        block_row_offsets: torch.Tensor,
        row_permutation: torch.Tensor,
        shape: tuple[int, int] | torch.Size,
        block: tuple[int, int],
        block_row_order: torch.Tensor | None = None,
    ) -> "BlockShuffledWeight":
        """Wrap tensors that were already validated together, skipping :meth:`validate` (which synchronizes a
        GPU); ``block_row_order``, if given, must be what the constructor would derive. For modules only."""
        weight = cls.__new__(cls)
        weight._assign(values, block_columns, block_row_offsets, row_permutation, shape, block)
        if block_row_order is None:
            block_row_order = descending_block_count_order(block_row_offsets)
        weight.block_row_order = block_row_order
        return weight

    def _assign(
        self,
        values: torch.Tensor,
        block_columns: torch.Tensor,
        block_row_offsets: torch.Tensor,
        row_permutation: torch.Tensor,
        shape: tuple[int, int] | torch.Size,
        block: tuple[int, int],
    ) -> None:
        """Set the fields; block is checked, the tensors are not."""
        self.block = check_block(block)
        self.shape = torch.Size(check_shape(shape))
        self.values = values
        self.block_columns = block_columns
        self.block_row_offsets = block_row_offsets
        self.row_permutation = row_permutation

    @property
    def block_count(self) -> int:
        """Number of kept blocks."""
        return self.values.shape[0]

    @property
    def density(self) -> float:
        """Fraction of the weight's blocks (equally, of its entries) that are kept."""
        rows, cols = self.shape
        return self.block_count * self.block[0] * self.block[1] / (rows * cols)

    @property
    def nbytes(self) -> int:
        """Bytes held: the four stored tensors + metadata (shape and block as four int64)."""
        metadata = 4 * 8
        tensors = (self.values, self.block_columns, self.block_row_offsets, self.row_permutation)
        return sum(t.numel() * t.element_size() for t in tensors) + metadata

    def validate(self) -> None:
        """Check that the tensors are consistent with each other, shape and block; TypeError for wrong types or
        dtypes, ValueError for wrong shapes, devices or contents (not read from tensors without values,
        :attr:`shape_only`)."""
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"shape: expected (N, K) with N, K > 0, got {tuple(self.shape)}")
        _check_divisible(self.shape, self.block, "shape")
        bn, bk = self.block
        block_rows, block_cols = self.shape[0] // bn, self.shape[1] // bk
        check_values(self.values)
        if self.values.dim() != 3 or tuple(self.values.shape[1:]) != (bn, bk):
            raise ValueError(f"values: expected shape (nblocks, {bn}, {bk}), got {tuple(self.values.shape)}")
        blocks = self.values.shape[0]
        expected_shapes = {
            "block_columns": (blocks,), "block_row_offsets": (block_rows + 1,), "row_permutation": (self.shape[0],)
        }
        for name, expected in expected_shapes.items():
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != INDEX_DTYPE:
                got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise TypeError(f"{name}: expected an int32 tensor, got {got}")
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{name}: expected shape {expected}, got {tuple(tensor.shape)}")
            if tensor.device != self.values.device:
                raise ValueError(f"{name}: on {tensor.device}, but values are on {self.values.device}")
        if self.shape_only:
            return
        offsets = self.block_row_offsets.long()
        if int(offsets[0]) != 0 or int(offsets[-1]) != blocks:
            raise ValueError(
                f"block_row_offsets: expected to run from 0 to nblocks={blocks}, "
                f"got {int(offsets[0])} to {int(offsets[-1])}"
            )
        counts = offsets.diff()
        if bool((counts < 0).any()) or bool((counts > block_cols).any()):
            row = int(((counts < 0) | (counts > block_cols)).nonzero()[0])
            raise ValueError(
                f"block_row_offsets: block-row {row} holds {int(counts[row])} blocks, expected 0 to {block_cols}"
            )
        columns = self.block_columns.long()
        if blocks and (int(columns.min()) < 0 or int(columns.max()) >= block_cols):
            bad = int(((columns < 0) | (columns >= block_cols)).nonzero()[0])
            raise ValueError(
                f"block_columns: expected block-columns in 0..{block_cols - 1} (K={self.shape[1]}, bk={bk}), "
                f"got {int(columns[bad])} for block {bad}"
            )
        if blocks > 1:
            same_row = block_rows_of(self.block_row_offsets, blocks).diff() == 0
            unordered = same_row & (columns.diff() <= 0)
            if bool(unordered.any()):
                bad = int(unordered.nonzero()[0]) + 1
                raise ValueError(
                    f"block_columns: must be strictly ascending within each block-row; block {bad} "
                    f"(column {int(columns[bad])}) follows column {int(columns[bad - 1])}"
                )
        _check_permutation_values(self.row_permutation, self.shape[0])

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        mask: torch.Tensor,
        block: tuple[int, int] = (32, 32),
        row_permutation: torch.Tensor | None = None,
    ) -> "BlockShuffledWeight":
        """Compress ``weight`` keeping the entries where ``mask`` is True; after ``row_permutation`` (identity if
        None) every ``block`` tile of the mask must be all True (kept) or all False (pruned). A mask without
        values (on the meta device or fake) is refused: how many blocks it keeps is unknown
        (:func:`nmspmm.prune.prune_block_shuffled` builds a shape-only weight of a sparsity)."""
        bn, bk = check_block(block)
        check_block_weight(weight, block)
        mask = checked_mask(mask, weight)
        if not (holds_values(weight) and holds_values(mask)):
            raise ValueError(
                "mask: holds no values (on the meta device or fake), so how many blocks it keeps is unknown; "
                "nmspmm.prune.prune_block_shuffled(weight, sparsity, block) builds a shape-only BlockShuffledWeight "
                "of that sparsity"
            )
        rows, cols = weight.shape
        if row_permutation is None:
            row_permutation = torch.arange(rows, dtype=INDEX_DTYPE, device=weight.device)
        _check_permutation_argument(row_permutation, rows, weight.device)
        permutation = row_permutation.long()
        tiles = mask[permutation].reshape(rows // bn, bn, cols // bk, bk).transpose(1, 2)
        kept_blocks = tiles.all(-1).all(-1)
        mixed = tiles.any(-1).any(-1) & ~kept_blocks
        if bool(mixed.any()):
            block_row, block_col = mixed.nonzero()[0].tolist()
            raise ValueError(
                f"mask: not block-structured with block {block} after row_permutation: the block of permuted "
                f"rows {block_row * bn}..{block_row * bn + bn - 1}, "
                f"columns {block_col * bk}..{block_col * bk + bk - 1} is partly kept"
            )
        values = weight[permutation].reshape(rows // bn, bn, cols // bk, bk).transpose(1, 2)[kept_blocks]
        if not bool(torch.isfinite(values).all()):
            raise ValueError("weight: kept entries must be finite, found NaN or Inf")
        counts = kept_blocks.sum(1)
        offsets = torch.zeros(rows // bn + 1, dtype=torch.long, device=weight.device)
        offsets[1:] = counts.cumsum(0)
        columns = kept_blocks.nonzero()[:, 1]
        return cls(
            values.contiguous(), columns.to(INDEX_DTYPE), offsets.to(INDEX_DTYPE),
            row_permutation.to(INDEX_DTYPE), weight.shape, (bn, bk),
        )

    @classmethod
    def prune(
        cls,
        weight: torch.Tensor,
        sparsity: float,
        block: tuple[int, int] = (32, 32),
        *,
        search: bool = True,
        iterations: int | None = None,
    ) -> "BlockShuffledWeight":
        """Deprecated: :func:`nmspmm.prune.prune_block_shuffled` (same arguments)."""
        return deprecated_prune(cls, weight, sparsity, block, search=search, iterations=iterations)

    def inverse_permutation(self) -> torch.Tensor:
        """int64 ``[N]``: the permuted position of every original row."""
        return inverse_permutation(self.row_permutation)

    def block_mask(self) -> torch.Tensor:
        """bool ``[N / bn, K / bk]``: True where a block of the permuted weight is kept."""
        bn, bk = self.block
        out = torch.zeros(self.shape[0] // bn, self.shape[1] // bk, dtype=torch.bool, device=self.device)
        out[block_rows_of(self.block_row_offsets, self.block_count), self.block_columns.long()] = True
        return out

    def mask(self) -> torch.Tensor:
        """bool ``[N, K]`` in the original row order: True where the weight is kept."""
        bn, bk = self.block
        permuted = self.block_mask().repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        return permuted[self.inverse_permutation()]

    def to_dense(self) -> torch.Tensor:
        """The dense ``[N, K]`` weight in the original row order, zeros where pruned."""
        permuted = dense_from_blocks(self.values, self.block_columns, self.block_row_offsets, self.shape)
        return permuted[self.inverse_permutation()]

    STATE_TENSORS = ("values", "block_columns", "block_row_offsets", "row_permutation")
    STATE_FIELDS = ("shape", "dtype", "block")

    @classmethod
    def placeholder_indices(cls, values: torch.Tensor, fields: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The index tensors of the placeholder structure: the identity row permutation and the first nblocks (the
        length of ``values``) blocks in row-major block order, whole block-rows from the top and the last partly."""
        bn, bk = check_block(fields["block"])
        rows, cols = check_shape(fields["shape"])
        blocks, per_row, device = values.shape[0], cols // bk, values.device
        block_columns = torch.arange(blocks, device=device) % per_row
        block_row_offsets = (torch.arange(rows // bn + 1, device=device) * per_row).clamp_max(blocks)
        return {
            "block_columns": block_columns.to(INDEX_DTYPE), "block_row_offsets": block_row_offsets.to(INDEX_DTYPE),
            "row_permutation": torch.arange(rows, dtype=INDEX_DTYPE, device=device),
        }

    def state_fields(self) -> dict[str, Any]:
        """JSON-able fields that, with :meth:`state_tensors`, rebuild the weight."""
        return {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."), "block": list(self.block)}

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], fields: dict[str, Any], *, allow_nonfinite: bool = False
    ) -> "BlockShuffledWeight":
        """Rebuild (and so validate) a weight from :meth:`state_tensors` and :meth:`state_fields`; TypeError or
        ValueError when they are missing pieces or disagree."""
        if not isinstance(tensors, dict) or set(tensors) != set(cls.STATE_TENSORS):
            got = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
            raise ValueError(f"tensors: expected the fields {list(cls.STATE_TENSORS)}, got {got}")
        if not isinstance(fields, dict) or set(fields) != _STATE_FIELDS:
            got = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
            raise ValueError(f"fields: expected the fields {sorted(_STATE_FIELDS)}, got {got}")
        values = tensors["values"]
        if not isinstance(values, torch.Tensor) or _DTYPE_NAMES.get(fields["dtype"]) != values.dtype:
            got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"fields: dtype {fields['dtype']!r} does not match values of {got}")
        shape, block = fields["shape"], fields["block"]
        if not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(type(side) is int for side in shape):
            raise ValueError(f"fields: expected shape [N, K] of two ints, got {shape!r}")
        return cls(
            *(tensors[name] for name in cls.STATE_TENSORS), tuple(shape), block, allow_nonfinite=allow_nonfinite
        )

    def __reduce__(self) -> tuple[Callable[..., BlockShuffledWeight], tuple[Any, ...]]:
        """Pickle as a call to the constructor's arguments, so unpickling (also torch.load's weights-only
        mode) always goes through :meth:`validate`."""
        args = (
            *(getattr(self, name) for name in self.STATE_TENSORS), tuple(self.shape), self.block,
            self.state_checksums(),
        )
        return _rebuild_block_shuffled_weight, args

    def __repr__(self) -> str:
        return (
            f"BlockShuffledWeight(shape={tuple(self.shape)}, block={self.block}, density={self.density:.3f}, "
            f"dtype={self.dtype}, device={self.device}, nbytes={self.nbytes})"
        )


def block_rows_of(block_row_offsets: torch.Tensor, blocks: int) -> torch.Tensor:
    """int64 ``[nblocks]``: the block-row of every block, from ``block_row_offsets`` (monotone, ending at nblocks)."""
    counts = block_row_offsets.long().diff()
    rows = torch.arange(counts.numel(), device=block_row_offsets.device)
    return rows.repeat_interleave(counts, output_size=blocks)


def dense_from_blocks(
    values: torch.Tensor, block_columns: torch.Tensor, block_row_offsets: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """The dense ``[N, K]`` weight in the PERMUTED row order from its blocks, zeros elsewhere; unchecked."""
    blocks, bn, bk = values.shape
    rows, cols = shape
    tiles = values.new_zeros(rows // bn, cols // bk, bn, bk)
    tiles[block_rows_of(block_row_offsets, blocks), block_columns.long()] = values
    return tiles.transpose(1, 2).reshape(rows, cols)


def inverse_permutation(permutation: torch.Tensor) -> torch.Tensor:
    """int64 inverse of a permutation: ``inverse[permutation[i]] == i``."""
    permutation = permutation.long()
    inverse = torch.empty_like(permutation)
    return inverse.scatter_(0, permutation, torch.arange(permutation.numel(), device=permutation.device))


def descending_block_count_order(block_row_offsets: torch.Tensor) -> torch.Tensor:
    """int32 block-rows sorted by descending block count, ties to the lower index."""
    counts = block_row_offsets.long().diff()
    return torch.sort(counts, descending=True, stable=True).indices.to(INDEX_DTYPE)


def _check_permutation_argument(row_permutation: torch.Tensor, rows: int, device: torch.device) -> None:
    """Check a ``row_permutation`` argument's type and shape (its contents are checked by the constructor)."""
    if not isinstance(row_permutation, torch.Tensor):
        raise TypeError(f"row_permutation: expected a torch.Tensor, got {type(row_permutation).__name__}")
    if row_permutation.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"row_permutation: expected an int32 or int64 tensor, got {row_permutation.dtype}")
    if row_permutation.shape != (rows,):
        raise ValueError(f"row_permutation: expected shape ({rows},), got {tuple(row_permutation.shape)}")
    if row_permutation.device != device:
        raise ValueError(f"row_permutation: on {row_permutation.device}, but weight is on {device}")
    _check_permutation_values(row_permutation, rows)


def _check_permutation_values(row_permutation: torch.Tensor, rows: int) -> None:
    """Raise ValueError unless ``row_permutation`` holds every row of ``0..rows-1`` exactly once."""
    permutation = row_permutation.long()
    outside = (permutation < 0) | (permutation >= rows)
    if bool(outside.any()):
        position = int(outside.nonzero()[0])
        raise ValueError(
            f"row_permutation: expected values in 0..{rows - 1}, "
            f"got {int(permutation[position])} at position {position}"
        )
    counts = torch.bincount(permutation, minlength=rows)
    if bool((counts != 1).any()):
        row = int((counts != 1).nonzero()[0])
        raise ValueError(
            f"row_permutation: not a permutation of 0..{rows - 1}: row {row} appears {int(counts[row])} times"
        )


def _rebuild_block_shuffled_weight(
    values: torch.Tensor,
    block_columns: torch.Tensor,
    block_row_offsets: torch.Tensor,
    row_permutation: torch.Tensor,
    shape: tuple[int, int],
    block: tuple[int, int],
    checksums: dict[str, int] | None = None,
) -> BlockShuffledWeight:
    """Unpickling entry point: the constructor, which validates everything a file may have tampered with, then
    the saved checksums, which catch a change that still validates (pickles written before them have none)."""
    weight = BlockShuffledWeight(values, block_columns, block_row_offsets, row_permutation, shape, block)
    weight.verify_state_checksums(checksums, "the pickled BlockShuffledWeight")
    return weight


# torch.load(weights_only=True) may call only allowlisted functions; the class itself is deliberately not
# allowlisted (see nm.py).
torch.serialization.add_safe_globals([_rebuild_block_shuffled_weight])
