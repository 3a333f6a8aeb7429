"""Unstructured sparse weights as a bitmap: any mask; each output feature keeps one bit per input feature and
its kept values packed in order, with where every block of inputs starts among them: the layout a tensor-core
kernel reads to load a tile as sparse and expand it to dense in registers before the MMA."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import deprecated_prune
from .pattern import check_shape
from .unstructured import INDEX_DTYPE, UnstructuredWeight

WORD_BITS = 32
"""Inputs per bitmap word (an int32)."""
BLOCK_INPUTS = 128
"""Inputs per block of ``block_offsets``: a kernel's K tile starts reading ``values`` there."""
_WORDS_PER_BLOCK = BLOCK_INPUTS // WORD_BITS
# Bit j of a word as an int32: distinct powers of two, bit 31 as -2**31, so that any sum of them is the word.
_BIT_VALUES = [1 << j for j in range(WORD_BITS - 1)] + [-(1 << (WORD_BITS - 1))]
# Elements of the [rows, words, 32] intermediates that packing and unpacking build at once (rows in chunks).
_CHUNK_ELEMENTS = 1 << 24


class BitmapWeight(UnstructuredWeight):
    """A pruned ``[N, K]`` weight as a bitmap: rows are output features, columns input features.

    Storage: ``values`` [nnz] (the kept entries in row-major order, as :attr:`CSRWeight.values`), int32 ``bitmap``
    ``[N, ceil(K / 32)]`` (bit j, least significant first, of word w of row r is set where row r keeps input
    ``32 * w + j``; bits at inputs >= K are zero) and int32 ``block_offsets`` ``[N, ceil(K / 128)]`` (entry
    ``[r, b]`` is the index in ``values`` of row r's first kept entry at input >= ``128 * b``), so that a kernel
    finds a tile's values without counting the bits of the rows and blocks before it.
    """

    STATE_TENSORS = ("values", "bitmap", "block_offsets")
    PRUNER = "prune_bitmap"
    bitmap: torch.Tensor
    block_offsets: torch.Tensor

    @classmethod
    def placeholder_indices(cls, values: torch.Tensor, fields: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``bitmap`` and ``block_offsets`` of the placeholder structure: the first nnz (the length of
        ``values``) entries in row-major order, whole rows from the top and the last of them partly."""
        rows, cols = check_shape(fields["shape"])
        nnz, device = values.shape[0], values.device
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)
        mask[: nnz // cols] = True
        mask[nnz // cols : nnz // cols + 1, : nnz % cols] = True
        starts = torch.arange(rows, device=device)[:, None] * cols
        block_starts = torch.arange(-(-cols // BLOCK_INPUTS), device=device)[None, :] * BLOCK_INPUTS
        block_offsets = (starts + block_starts).clamp_max(nnz)
        return {"bitmap": bitmap_of(mask), "block_offsets": block_offsets.to(INDEX_DTYPE)}

    def __init__(
        self,
        values: torch.Tensor,
        bitmap: torch.Tensor,
        block_offsets: torch.Tensor,
        shape: tuple[int, int] | torch.Size,
        *,
        allow_nonfinite: bool = False,
    ) -> None:
        self._construct(values, bitmap, block_offsets, shape, allow_nonfinite)

    def index_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``bitmap`` ``[N, ceil(K / 32)]`` and ``block_offsets`` ``[N, ceil(K / 128)]``."""
        rows, cols = self.shape
        return (rows, -(-cols // WORD_BITS)), (rows, -(-cols // BLOCK_INPUTS))

    def validate_structure(self) -> None:
        """No bits at inputs >= K; as many values as bits set; block offsets those the bitmap gives."""
        cols, nnz = self.shape[1], self.nnz
        words = self.bitmap.shape[1]
        tail = cols - (words - 1) * WORD_BITS  # inputs in the last word of each row
        if tail < WORD_BITS:
            beyond = (self.bitmap[:, -1].long() & 0xFFFFFFFF) >> tail  # as uint32: bit 31 is not a sign
            if bool(beyond.any()):
                row = int(beyond.nonzero()[0])
                word = int(self.bitmap[row, -1]) & 0xFFFFFFFF
                raise ValueError(
                    f"bitmap: bits at inputs >= K={cols} must be zero, but word {words - 1} of row {row} is "
                    f"{word:#010x} (it keeps inputs up to {(words - 1) * WORD_BITS + word.bit_length() - 1})"
                )
        counts = kept_per_block(self.bitmap)
        kept = int(counts.sum())
        if kept != nnz:
            raise ValueError(f"values: expected nnz={kept} entries (the bits set in bitmap), got {nnz}")
        expected = block_offsets_of(counts)
        wrong = self.block_offsets.long() != expected
        if bool(wrong.any()):
            row, block = wrong.nonzero()[0].tolist()
            raise ValueError(
                f"block_offsets: expected the index in values of each row's first kept entry at input >= "
                f"{BLOCK_INPUTS} * block (as bitmap gives them), but block_offsets[{row}, {block}] is "
                f"{int(self.block_offsets[row, block])}, not {int(expected[row, block])}"
            )

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor) -> "BitmapWeight":
        """Compress ``weight`` [N, K] keeping the entries where ``mask`` (bool, or 0/1 integers) is True
        (:meth:`UnstructuredWeight.kept_entries` says what is refused)."""
        values, mask = cls.kept_entries(weight, mask)
        bitmap = bitmap_of(mask)
        block_offsets = block_offsets_of(kept_per_block(bitmap)).to(INDEX_DTYPE)
        return cls(values, bitmap, block_offsets, weight.shape)

    @classmethod
    def prune(cls, weight: torch.Tensor, sparsity: float) -> "BitmapWeight":
        """Deprecated: :func:`nmspmm.prune.prune_bitmap` (same arguments), where every format's pruning lives."""
        return deprecated_prune(cls, weight, sparsity)

    def mask(self) -> torch.Tensor:
        """bool ``[N, K]``: True where the weight is kept."""
        return mask_of(self.bitmap, self.shape[1])

    def to_dense(self) -> torch.Tensor:
        """The dense ``[N, K]`` weight, zeros where pruned."""
        return dense_from_bitmap(self.values, self.bitmap, self.shape)

    def coordinates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 ``(rows, cols)`` [nnz]: the row and input of every kept value, in the values' order (what CSR's
        SDDMM reads for the weight gradient). Derived once, cached on the weight."""
        if "coordinates" not in self._derived:
            rows, cols = self.mask().nonzero(as_tuple=True)
            self._derived["coordinates"] = (rows.to(INDEX_DTYPE), cols.to(INDEX_DTYPE))
        return self._derived["coordinates"]

    def transposed_structure(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(bitmap, block_offsets, permutation)`` of the transposed ``[K, N]`` weight, whose values are
        ``values[permutation]`` (int64 [nnz]): the structure the input gradient ``dY @ W`` runs on. Derived once,
        cached on the weight."""
        if "transposed" not in self._derived:
            mask_t = self.mask().t()
            bitmap_t = bitmap_of(mask_t)
            offsets_t = block_offsets_of(kept_per_block(bitmap_t)).to(INDEX_DTYPE)
            # Number the kept entries in row-major order, then read the numbers in the transpose's order.
            order = torch.zeros(self.shape, dtype=torch.long, device=self.values.device)
            order[self.mask()] = torch.arange(self.nnz, device=self.values.device)
            self._derived["transposed"] = (bitmap_t, offsets_t, order.t()[mask_t])
        return self._derived["transposed"]

    def __reduce__(self) -> tuple[Callable[..., BitmapWeight], tuple[Any, ...]]:
        """Pickle as a call to the constructor's arguments, so unpickling (also torch.load's weights-only
        mode) always goes through :meth:`validate`."""
        return _rebuild_bitmap_weight, self._reduce_args()


def bitmap_of(mask: torch.Tensor) -> torch.Tensor:
    """int32 ``[N, ceil(K / 32)]``: bit j of word w of row r set where the bool ``mask`` [N, K] keeps input
    ``32 * w + j`` of row r, bits past K zero; unchecked. Built in row chunks, so that the int32 intermediate
    stays small beside the mask."""
    rows, cols = mask.shape
    words = -(-cols // WORD_BITS)
    bits = torch.tensor(_BIT_VALUES, dtype=torch.int32, device=mask.device)
    out = torch.empty(rows, words, dtype=torch.int32, device=mask.device)
    chunk = max(1, _CHUNK_ELEMENTS // (words * WORD_BITS))
    for first in range(0, rows, chunk):
        padded = torch.nn.functional.pad(mask[first : first + chunk], (0, words * WORD_BITS - cols))
        word_bits = padded.reshape(-1, words, WORD_BITS).to(torch.int32) * bits
        out[first : first + chunk] = word_bits.sum(-1, dtype=torch.int32)
    return out


def mask_of(bitmap: torch.Tensor, cols: int) -> torch.Tensor:
    """bool ``[N, cols]``: True where int32 ``bitmap`` [N, ceil(cols / 32)] has the input's bit set; unchecked."""
    rows, words = bitmap.shape
    shifts = torch.arange(WORD_BITS, dtype=torch.int32, device=bitmap.device)
    out = torch.empty(rows, cols, dtype=torch.bool, device=bitmap.device)
    chunk = max(1, _CHUNK_ELEMENTS // (words * WORD_BITS))
    for first in range(0, rows, chunk):
        # An arithmetic shift copies bit 31 down, so the low bit of every shift is still the input's bit.
        bits = (bitmap[first : first + chunk, :, None] >> shifts) & 1
        out[first : first + chunk] = bits.reshape(-1, words * WORD_BITS)[:, :cols].bool()
    return out


def kept_per_block(bitmap: torch.Tensor) -> torch.Tensor:
    """int64 ``[N, ceil(K / 128)]``: the bits set in each row's block of 128 inputs of int32 ``bitmap``
    ``[N, ceil(K / 32)]`` (popcounts of its words, as unsigned, summed four at a time); unchecked."""
    x = bitmap.long() & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    per_word = ((x * 0x01010101) >> 24) & 0xFF
    rows, words = bitmap.shape
    blocks = -(-words // _WORDS_PER_BLOCK)
    padded = torch.nn.functional.pad(per_word, (0, blocks * _WORDS_PER_BLOCK - words))
    return padded.reshape(rows, blocks, _WORDS_PER_BLOCK).sum(-1)


def block_offsets_of(counts: torch.Tensor) -> torch.Tensor:
    """int64 ``[N, B]``: where each (row, block) starts in ``values``, from the kept entries per (row, block)
    (:func:`kept_per_block`): their running total in row-major order, before the block itself; unchecked."""
    flat = counts.flatten()
    return (flat.cumsum(0) - flat).view(counts.shape)


def dense_from_bitmap(values: torch.Tensor, bitmap: torch.Tensor, shape: tuple[int, int] | torch.Size) -> torch.Tensor:
    """The dense ``shape`` matrix holding ``values`` (row-major) where ``bitmap`` has bits set, zeros elsewhere;
    unchecked, differentiable in ``values``."""
    return values.new_zeros(tuple(shape)).masked_scatter(mask_of(bitmap, shape[1]), values)


def _rebuild_bitmap_weight(
    values: torch.Tensor, bitmap: torch.Tensor, block_offsets: torch.Tensor, shape: tuple[int, int],
    checksums: dict[str, int] | None = None,
) -> BitmapWeight:
    """Unpickling entry point: the constructor, which validates everything a file may have tampered with, then
    the saved checksums, which catch a change that still validates."""
    weight = BitmapWeight(values, bitmap, block_offsets, shape)
    weight.verify_state_checksums(checksums, "the pickled BitmapWeight")
    return weight


# torch.load(weights_only=True) may call only allowlisted functions; the class itself is deliberately not
# allowlisted, so that a crafted file cannot build an instance through __new__ alone, skipping validation.
torch.serialization.add_safe_globals([_rebuild_bitmap_weight])
