"""What the unstructured formats (CSR and the bitmap) share: the kept values ``[nnz]`` in row-major order beside
two int32 index tensors and a shape ``[N, K]``. Construction, trusted wrapping, the counts, the checks of the values
and of the index tensors' types, the compression of a dense weight's kept entries, and the saved state are written
once here; each format says what its index tensors mean and validates that."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .base import SparseWeightBase
from .pattern import check_shape, check_state_dtype, check_values, check_weight_matrix, checked_mask, holds_values

if TYPE_CHECKING:
    from typing_extensions import Self

INDEX_DTYPE = torch.int32
"""The dtype of every index tensor of the unstructured formats."""
MAX_NNZ = torch.iinfo(INDEX_DTYPE).max
"""The most kept entries int32 indices address."""


class UnstructuredWeight(SparseWeightBase):
    """An unstructured ``[N, K]`` weight: ``values`` [nnz] (the kept entries in row-major order) and the two int32
    index tensors named by ``STATE_TENSORS[1:]``. Subclasses define those names, :meth:`validate_structure` and
    ``PRUNER`` (the name of their function in :mod:`nmspmm.prune`)."""

    STATE_FIELDS = ("shape", "dtype")
    PRUNER: ClassVar[str]

    def _construct(
        self, values: torch.Tensor, first: torch.Tensor, second: torch.Tensor, shape: tuple[int, int] | torch.Size,
        allow_nonfinite: bool,
    ) -> None:
        """The constructors' body: set the fields, validate them, check the values' storage."""
        self._assign(values, first, second, shape)
        self.validate()
        self.check_storage(allow_nonfinite)

    @classmethod
    def _trusted(
        cls,
        values: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        shape: tuple[int, int] | torch.Size,
        derived: dict[str, Any] | None = None,
    ) -> Self:
        """Wrap tensors that were already validated together, skipping :meth:`validate` (which synchronizes a
        GPU). ``derived``, if given, is the cache of a weight with this very structure (the same index tensors),
        then shared with it. For ops and modules only."""
        weight = cls.__new__(cls)
        weight._assign(values, first, second, shape, derived)
        return weight

    def _with_values(self, values: torch.Tensor) -> Self:
        """A trusted weight of this structure (sharing its index tensors and derived caches) holding ``values``
        ([nnz], on this device); for ops that compute values at the kept positions."""
        return type(self)._trusted(values, *self._indices(), self.shape, self._derived)

    def _assign(
        self,
        values: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        shape: tuple[int, int] | torch.Size,
        derived: dict[str, Any] | None = None,
    ) -> None:
        """Set the fields; the shape is converted (a TypeError if it is not ints), nothing else is checked."""
        self.shape = torch.Size(check_shape(shape))
        self.values = values
        for name, tensor in zip(self.STATE_TENSORS[1:], (first, second)):
            setattr(self, name, tensor)
        self._derived = {} if derived is None else derived

    def _indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two index tensors, in ``STATE_TENSORS`` order."""
        first, second = (getattr(self, name) for name in self.STATE_TENSORS[1:])
        return first, second

    @property
    def nnz(self) -> int:
        """Number of kept weights."""
        return self.values.shape[0]

    @property
    def sparsity(self) -> float:
        """Fraction of the ``N * K`` weights pruned."""
        return 1.0 - self.nnz / (self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes held: values + the two index tensors + metadata (the shape as two int64)."""
        tensors = (self.values, *self._indices())
        return sum(t.numel() * t.element_size() for t in tensors) + 2 * 8

    def validate(self) -> None:
        """Check the shape, the values (a 1-D tensor of a supported dtype) and the index tensors' types, shapes
        and devices, then (not for tensors without values, :attr:`shape_only`) that they form the format's
        structure (:meth:`validate_structure`); raise TypeError or ValueError naming the field if not."""
        if len(self.shape) != 2 or self.shape[0] <= 0 or self.shape[1] <= 0:
            raise ValueError(f"shape: expected (N, K) with N, K > 0, got {tuple(self.shape)}")
        values = self.values
        check_values(values)
        if values.dim() != 1:
            raise ValueError(f"values: expected a 1-D [nnz] tensor, got shape {tuple(values.shape)}")
        if values.shape[0] > MAX_NNZ:
            raise ValueError(
                f"values: holds {values.shape[0]} entries, more than int32 indices address (at most {MAX_NNZ})"
            )
        for name, tensor, shape in zip(self.STATE_TENSORS[1:], self._indices(), self.index_shapes()):
            check_index_tensor(tensor, name, shape, values.device)
        if not self.shape_only:
            self.validate_structure()

    def index_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes the two index tensors must have, for this shape and nnz."""
        raise NotImplementedError

    def validate_structure(self) -> None:
        """Check that the index tensors (of the right types and shapes) form the format's structure."""
        raise NotImplementedError

    @classmethod
    def kept_entries(cls, weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, mask)`` of a dense ``weight`` [N, K] compressed where ``mask`` (bool, or 0/1 integers) is
        True: the kept entries in row-major order and the mask as bool. The kept entries must be finite. A mask
        without values (on the meta device or fake) is refused: how many entries it keeps is unknown (the pruning
        function builds a shape-only weight of a sparsity)."""
        # Pattern 1:1 with V = 1 constrains nothing: this checks type, dtype and a non-empty 2-D shape.
        check_weight_matrix(weight, 1, 1, 1)
        mask = checked_mask(mask, weight)
        if not (holds_values(weight) and holds_values(mask)):
            raise ValueError(
                "mask: holds no values (on the meta device or fake), so how many entries it keeps is unknown; "
                f"nmspmm.prune.{cls.PRUNER}(weight, sparsity) builds a shape-only {cls.__name__} of that sparsity"
            )
        kept = int(mask.sum())
        if kept > MAX_NNZ:
            raise ValueError(f"mask: keeps {kept} entries, more than int32 indices address")
        values = weight[mask]
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            rows, cols = mask.nonzero(as_tuple=True)
            j = int((~finite).nonzero()[0])
            raise ValueError(
                f"weight: kept entries must be finite, got {values[j].item()} at row {int(rows[j])}, "
                f"column {int(cols[j])}"
            )
        return values, mask

    def state_fields(self) -> dict[str, Any]:
        """The JSON-able fields that, with :meth:`state_tensors`, rebuild this weight."""
        return {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], fields: dict[str, Any], *, allow_nonfinite: bool = False
    ) -> Self:
        """Rebuild (and so validate) a weight from :meth:`state_tensors` and :meth:`state_fields`."""
        check_state_dtype(tensors["values"], fields["dtype"])
        first, second = (tensors[name] for name in cls.STATE_TENSORS[1:])
        return cls(tensors["values"], first, second, fields["shape"], allow_nonfinite=allow_nonfinite)

    def _reduce_args(self) -> tuple[Any, ...]:
        """What the formats' pickles pass to their rebuild functions: the constructor's arguments and checksums."""
        return (self.values, *self._indices(), tuple(self.shape), self.state_checksums())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={tuple(self.shape)}, nnz={self.nnz}, sparsity={self.sparsity:.3f}, "
            f"dtype={self.dtype}, device={self.device}, nbytes={self.nbytes})"
        )


def check_index_tensor(tensor: torch.Tensor, name: str, shape: tuple[int, ...], device: torch.device) -> None:
    """Check that an index field is an int32 tensor of ``shape`` on ``device``."""
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != INDEX_DTYPE:
        got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise TypeError(f"{name}: expected an int32 tensor, got {got}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name}: on {tensor.device}, but values are on {device}")
