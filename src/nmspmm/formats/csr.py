"""Unstructured sparse weights in compressed sparse row (CSR) form: any mask; each output feature lists its
kept input features in ascending order, the layout Sputnik-style kernels read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .base import deprecated_prune
from .pattern import check_shape
from .unstructured import INDEX_DTYPE, UnstructuredWeight


class TransposedStructure(NamedTuple):
    """The CSR structure of the transposed ``[K, N]`` weight, for the input gradient ``dY @ W``; its values
    are ``values[permutation]``. All int32."""

    row_offsets: torch.Tensor
    """[K + 1]: where each input feature's nonzeros start."""
    col_indices: torch.Tensor
    """[nnz]: the output feature of every nonzero, ascending within each input feature."""
    permutation: torch.Tensor
    """[nnz]: for every nonzero of the transpose, its position in the weight's own ``values``."""
    row_order: torch.Tensor
    """[K]: input features by descending nonzero count (the launch order of the transposed product)."""


class CSRWeight(UnstructuredWeight):
    """A pruned ``[N, K]`` weight in CSR form: rows are output features, columns input features.

    Storage: ``values`` [nnz], int32 ``col_indices`` [nnz] (strictly ascending within each row) and int32
    ``row_offsets`` [N + 1] (row ``r`` holds nonzeros ``row_offsets[r]`` to ``row_offsets[r + 1]``).
    Kernels also read structures derived from these once, then cached on the object (never stored):
    :meth:`row_order`, :meth:`row_indices`, :meth:`tile_offsets` and :meth:`transposed_structure`.
    """

    STATE_TENSORS = ("values", "col_indices", "row_offsets")
    PRUNER = "prune_csr"
    col_indices: torch.Tensor
    row_offsets: torch.Tensor

    @classmethod
    def placeholder_indices(cls, values: torch.Tensor, fields: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``col_indices`` and ``row_offsets`` of the placeholder structure: the first nnz (the length of
        ``values``) entries in row-major order, whole rows from the top and the last of them partly."""
        rows, cols = check_shape(fields["shape"])
        nnz, device = values.shape[0], values.device
        col_indices = torch.arange(nnz, device=device) % cols
        row_offsets = (torch.arange(rows + 1, device=device) * cols).clamp_max(nnz)
        return {"col_indices": col_indices.to(INDEX_DTYPE), "row_offsets": row_offsets.to(INDEX_DTYPE)}

    def __init__(
        self,
        values: torch.Tensor,
        col_indices: torch.Tensor,
        row_offsets: torch.Tensor,
        shape: tuple[int, int] | torch.Size,
        *,
        allow_nonfinite: bool = False,
    ) -> None:
        self._construct(values, col_indices, row_offsets, shape, allow_nonfinite)

    def index_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``col_indices`` [nnz] and ``row_offsets`` [N + 1]."""
        return (self.nnz,), (self.shape[0] + 1,)

    def validate_structure(self) -> None:
        """Offsets from 0 to nnz, non-decreasing; columns in [0, K), strictly ascending within each row."""
        cols, nnz = self.shape[1], self.nnz
        offsets, columns = self.row_offsets, self.col_indices
        first, last = offsets[[0, -1]].tolist()
        if first != 0 or last != nnz:
            raise ValueError(
                f"row_offsets: expected to start at 0 and end at nnz={nnz} (the length of values), "
                f"got {first} and {last}"
            )
        decreasing = offsets[1:] < offsets[:-1]
        if bool(decreasing.any()):
            row = int(decreasing.nonzero()[0])
            raise ValueError(
                f"row_offsets: must be non-decreasing, but row_offsets[{row + 1}]={int(offsets[row + 1])} "
                f"< row_offsets[{row}]={int(offsets[row])}"
            )
        outside = (columns < 0) | (columns.long() >= cols)  # in int64: an int32 comparison with K would wrap
        if bool(outside.any()):
            j = int(outside.nonzero()[0])
            raise ValueError(f"col_indices: expected values in [0, K={cols}), got {int(columns[j])} at position {j}")
        row_of = row_indices_of(offsets, nnz)
        unordered = (row_of[1:] == row_of[:-1]) & (columns[1:] <= columns[:-1])
        if bool(unordered.any()):
            j = int(unordered.nonzero()[0])
            raise ValueError(
                f"col_indices: must be strictly ascending within each row, but row {int(row_of[j])} has column "
                f"{int(columns[j + 1])} after {int(columns[j])} (positions {j} and {j + 1})"
            )

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor) -> "CSRWeight":
        """Compress ``weight`` [N, K] keeping the entries where ``mask`` (bool, or 0/1 integers) is True
        (:meth:`UnstructuredWeight.kept_entries` says what is refused)."""
        values, mask = cls.kept_entries(weight, mask)
        per_row = mask.sum(1)
        columns = mask.nonzero(as_tuple=True)[1].to(INDEX_DTYPE)
        row_offsets = torch.nn.functional.pad(per_row.cumsum(0), (1, 0)).to(INDEX_DTYPE)
        return cls(values, columns, row_offsets, weight.shape)

    @classmethod
    def prune(cls, weight: torch.Tensor, sparsity: float) -> "CSRWeight":
        """Deprecated: :func:`nmspmm.prune.prune_csr` (same arguments), where every format's pruning lives."""
        return deprecated_prune(cls, weight, sparsity)

    def row_order(self) -> torch.Tensor:
        """int32 [N]: rows by descending nonzero count, ties in row order (the load-balancing launch order)."""
        if "row_order" not in self._derived:
            self._derived["row_order"] = launch_order(self.row_offsets)
        return self._derived["row_order"]

    def row_indices(self) -> torch.Tensor:
        """int32 [nnz]: the row of every nonzero (coordinate form, as the SDDMM reads it)."""
        if "row_indices" not in self._derived:
            self._derived["row_indices"] = row_indices_of(self.row_offsets, self.nnz)
        return self._derived["row_indices"]

    def tile_offsets(self, width: int) -> torch.Tensor:
        """int32 ``[N * ceil(K / width) + 1]``: where the nonzeros of each (row, tile of ``width`` columns) start,
        in storage order, and ``nnz`` last (the tiled SDDMM reads it)."""
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width: expected a positive number of columns, got {width!r}")
        key = f"tile_offsets_{width}"
        if key not in self._derived:
            self._derived[key] = tile_offsets_of(self.row_indices(), self.col_indices, *self.shape, width)
        return self._derived[key]

    def transposed_structure(self) -> TransposedStructure:
        """The structure of the transposed ``[K, N]`` weight (for the input gradient); its values are
        ``values[permutation]``."""
        if "transposed" not in self._derived:
            self._derived["transposed"] = transposed_structure_of(self.row_indices(), self.col_indices, self.shape[1])
        return self._derived["transposed"]

    def mask(self) -> torch.Tensor:
        """bool ``[N, K]``: True where the weight is kept."""
        out = torch.zeros(self.shape, dtype=torch.bool, device=self.device)
        out[self.row_indices().long(), self.col_indices.long()] = True
        return out

    def to_dense(self) -> torch.Tensor:
        """The dense ``[N, K]`` weight, zeros where pruned."""
        return dense_from_csr(self.values, self.row_indices(), self.col_indices, self.shape)

    def __reduce__(self) -> tuple[Callable[..., CSRWeight], tuple[Any, ...]]:
        """Pickle as a call to the constructor's arguments, so unpickling (also torch.load's weights-only
        mode) always goes through :meth:`validate`."""
        return _rebuild_csr_weight, self._reduce_args()


def row_indices_of(row_offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """int32 [nnz]: the row of every nonzero, from non-decreasing int32 ``row_offsets``; unchecked."""
    positions = torch.arange(nnz, dtype=row_offsets.dtype, device=row_offsets.device)
    return torch.searchsorted(row_offsets, positions, right=True, out_int32=True) - 1


def tile_offsets_of(
    row_indices: torch.Tensor, col_indices: torch.Tensor, rows: int, cols: int, width: int
) -> torch.Tensor:
    """int32 ``[rows * ceil(cols / width) + 1]``: where each (row, column tile) run of nonzeros starts, for
    coordinates in CSR order (rows ascending, columns ascending within a row), and the nonzero count last;
    unchecked. The runs' keys ``row * tiles + column // width`` never decrease, so one binary search finds all."""
    tiles = -(-cols // width)
    keys = row_indices.long() * tiles + torch.div(col_indices.long(), width, rounding_mode="floor")
    cells = torch.arange(rows * tiles + 1, dtype=torch.int64, device=col_indices.device)
    return torch.searchsorted(keys, cells, out_int32=True)


def launch_order(row_offsets: torch.Tensor) -> torch.Tensor:
    """int32 [N]: rows by descending length, ties in row order (stable), from ``row_offsets`` [N + 1]."""
    lengths = row_offsets[1:] - row_offsets[:-1]
    return torch.sort(lengths, descending=True, stable=True).indices.to(INDEX_DTYPE)


def transposed_structure_of(row_indices: torch.Tensor, col_indices: torch.Tensor, cols: int) -> TransposedStructure:
    """The CSR structure of the ``[cols, N]`` transpose from a weight's coordinates (rows ascending, columns
    ascending within each row); unchecked. Shapes depend only on the inputs', so torch.compile traces it."""
    sorted_columns, permutation = torch.sort(col_indices, stable=True)
    boundaries = torch.arange(cols + 1, dtype=INDEX_DTYPE, device=col_indices.device)
    row_offsets = torch.searchsorted(sorted_columns, boundaries, out_int32=True)
    return TransposedStructure(
        row_offsets, row_indices[permutation], permutation.to(INDEX_DTYPE), launch_order(row_offsets)
    )


def dense_from_csr(
    values: torch.Tensor, row_indices: torch.Tensor, col_indices: torch.Tensor, shape: tuple[int, int] | torch.Size
) -> torch.Tensor:
    """The dense ``shape`` matrix holding ``values`` at (``row_indices``, ``col_indices``), zeros elsewhere;
    unchecked, differentiable in ``values``."""
    out = values.new_zeros(tuple(shape))
    return out.index_put((row_indices.long(), col_indices.long()), values)


def _rebuild_csr_weight(
    values: torch.Tensor, col_indices: torch.Tensor, row_offsets: torch.Tensor, shape: tuple[int, int],
    checksums: dict[str, int] | None = None,
) -> CSRWeight:
    """Unpickling entry point: the constructor, which validates everything a file may have tampered with, then
    the saved checksums, which catch a change that still validates (pickles written before them have none)."""
    weight = CSRWeight(values, col_indices, row_offsets, shape)
    weight.verify_state_checksums(checksums, "the pickled CSRWeight")
    return weight


# torch.load(weights_only=True) may call only allowlisted functions; the class itself is deliberately not
# allowlisted, so that a crafted file cannot build an instance through __new__ alone, skipping validation.
torch.serialization.add_safe_globals([_rebuild_csr_weight])
