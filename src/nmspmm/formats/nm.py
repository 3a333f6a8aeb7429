"""Vector-wise N:M sparse weights: in every run of m input features n are kept, and V consecutive
output features (one V-group) share the choice."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .base import SparseWeightBase
from .pattern import (
    check_shape,
    check_state_dtype,
    check_values,
    check_vector,
    check_weight_matrix,
    checked_mask,
    holds_values,
    parse_pattern,
)

if TYPE_CHECKING:
    from .quantized import QuantizedNMWeight

OFFSET_DTYPE = torch.uint8


class NMSparseWeight(SparseWeightBase):
    """A pruned ``[N, K]`` weight in vector-wise N:M form.

    Storage, chosen so that ``nbytes`` is below the dense bytes for every pattern and dtype:

    * ``values``: ``[N, K // m * n]``, each row's kept weights in ascending input-feature order;
    * ``offsets``: uint8 ``[N // V, K // m, min(n, m - n)]``, positions within each group of m shared by
      a V-group: the kept positions when ``n <= m - n``, otherwise the dropped ones (fewer bytes).

    Kernels read :meth:`kept_offsets`, which is ``offsets`` itself in the first case and is derived once
    (then cached on the object) in the second.
    """

    def __init__(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        pattern: str,
        vector: int,
        shape: tuple[int, int] | torch.Size,
        *,
        allow_nonfinite: bool = False,
    ) -> None:
        self._assign(values, offsets, pattern, vector, shape)
        self.validate()
        self.check_storage(allow_nonfinite)

    @classmethod
    def _trusted(
        cls,
        values: torch.Tensor,
        offsets: torch.Tensor,
        pattern: str,
        vector: int,
        shape: tuple[int, int] | torch.Size,
        kept_offsets: torch.Tensor | None = None,
        kept_bits: torch.Tensor | None = None,
    ) -> "NMSparseWeight":
        """Wrap tensors that were already validated together, skipping :meth:`validate` (which synchronizes a
        GPU); ``kept_offsets``, if given, must be what :meth:`kept_offsets` would derive, and ``kept_bits`` what
        the element-wise kernel derives from them (:meth:`kept_bitmap`). For modules only."""
        weight = cls.__new__(cls)
        weight._assign(values, offsets, pattern, vector, shape, kept_offsets, kept_bits)
        return weight

    def _assign(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        pattern: str,
        vector: int,
        shape: tuple[int, int] | torch.Size,
        kept_offsets: torch.Tensor | None = None,
        kept_bits: torch.Tensor | None = None,
    ) -> None:
        """Set the fields; pattern and vector are parsed, the tensors are not checked."""
        self.n, self.m = parse_pattern(pattern)
        self.vector = check_vector(vector)
        self.shape = torch.Size(check_shape(shape))
        self.values = values
        self.offsets = offsets
        # (the offsets tensor it was derived from, the kept offsets): derived again for a new offsets tensor.
        cached = kept_offsets is not None and holds_values(offsets)  # offsets without values have no address
        self._kept_offsets_cache = (offsets, offsets.data_ptr(), kept_offsets) if cached else None
        self._kept_bits = kept_bits

    def kept_bitmap(self) -> torch.Tensor | None:
        """The element-wise kernel's bitmap of the kept inputs where the weight's holder keeps one (a module's
        derived buffer: a compiled forward then takes it as an input rather than deriving it on every call); None
        otherwise, and the kernel derives it (once per kept-offsets tensor)."""
        return self._kept_bits

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def stores_dropped(self) -> bool:
        """True when ``offsets`` lists the dropped positions (n > m - n), False when it lists the kept ones."""
        return self.n > self.m - self.n

    @property
    def nbytes(self) -> int:
        """Bytes held: values + offsets + metadata (pattern, vector and shape as five int64)."""
        metadata = 5 * 8
        return self.values.numel() * self.values.element_size() + self.offsets.numel() + metadata

    @property
    def kept_per_row(self) -> int:
        """Kept input features per output feature: K * n / m."""
        return self.shape[1] // self.m * self.n

    def validate(self) -> None:
        """Check that the tensors are consistent with pattern, vector and shape; raise ValueError if not."""
        rows, cols = self.shape if len(self.shape) == 2 else (None, None)
        if rows is None or rows <= 0 or cols <= 0:
            raise ValueError(f"shape: expected (N, K) with N, K > 0, got {tuple(self.shape)}")
        if cols % self.m:
            raise ValueError(f"shape: K={cols} must be divisible by m={self.m} of the pattern {self.pattern}")
        if rows % self.vector:
            raise ValueError(f"vector: V={self.vector} must divide N={rows}")
        self._check_values()
        expected_values = (rows, self.kept_per_row)
        if tuple(self.values.shape) != expected_values:
            raise ValueError(f"values: expected shape {expected_values}, got {tuple(self.values.shape)}")
        if not isinstance(self.offsets, torch.Tensor) or self.offsets.dtype != OFFSET_DTYPE:
            got = self.offsets.dtype if isinstance(self.offsets, torch.Tensor) else type(self.offsets).__name__
            raise TypeError(f"offsets: expected a uint8 tensor, got {got}")
        stored = min(self.n, self.m - self.n)
        expected_offsets = (rows // self.vector, cols // self.m, stored)
        if tuple(self.offsets.shape) != expected_offsets:
            raise ValueError(f"offsets: expected shape {expected_offsets}, got {tuple(self.offsets.shape)}")
        if self.offsets.device != self.values.device:
            raise ValueError(f"offsets: on {self.offsets.device}, but values are on {self.values.device}")
        if self.shape_only:
            return
        offsets = self.offsets.long()
        if bool((offsets >= self.m).any()):
            raise ValueError(f"offsets: every offset must be < m={self.m}, got max {int(offsets.max())}")
        if stored > 1 and bool((offsets[..., 1:] <= offsets[..., :-1]).any()):
            bad = (offsets[..., 1:] <= offsets[..., :-1]).nonzero()[0].tolist()
            raise ValueError(
                f"offsets: must be strictly ascending within each group of m={self.m}; "
                f"V-group {bad[0]}, input group {bad[1]} is not"
            )

    def _check_values(self) -> None:
        """Refuse ``values`` of a dtype this format does not store (float16, bfloat16 or float32 here)."""
        check_values(self.values)

    def quantize(self, dtype: torch.dtype) -> QuantizedNMWeight:
        """This weight with its kept values in ``dtype`` (``torch.float8_e4m3fn`` or ``torch.int8``), one fp32
        scale per output feature (its largest kept magnitude over the dtype's largest), the structure shared:
        a :class:`~nmspmm.formats.quantized.QuantizedNMWeight`, whose products return this weight's dtype."""
        from .quantized import quantize_nm

        return quantize_nm(self, dtype)

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, mask: torch.Tensor, pattern: str, vector: int = 1
    ) -> "NMSparseWeight":
        """Compress ``weight`` keeping the entries where ``mask`` is True; the mask must already be N:M
        vector-wise (exactly n kept in each group of m, the same choice across each V-group). A ``weight`` and
        ``mask`` without values (on the meta device or fake: :func:`~nmspmm.formats.pattern.holds_values`) give a
        shape-only weight of the placeholder structure (:meth:`placeholder_indices`: the first n of every m)."""
        n, m = parse_pattern(pattern)
        check_vector(vector)
        check_weight_matrix(weight, n, m, vector)
        mask = checked_mask(mask, weight)
        rows, cols = weight.shape
        if not (holds_values(weight) and holds_values(mask)):
            fields = {"pattern": pattern, "vector": vector, "shape": [rows, cols]}
            return cls.placeholder(weight.new_empty(rows, cols // m * n), fields)
        groups = mask.reshape(rows // vector, vector, cols // m, m)
        differs = groups != groups[:, :1]
        if bool(differs.any()):
            g, r, j, _ = differs.nonzero()[0].tolist()
            raise ValueError(
                f"mask: not vector-wise with V={vector}: row {g * vector + r} differs from row {g * vector} "
                f"in input features {j * m}..{j * m + m - 1}"
            )
        counts = groups[:, 0].sum(-1)
        if bool((counts != n).any()):
            g, j = (counts != n).nonzero()[0].tolist()
            raise ValueError(
                f"mask: not {n}:{m}: rows {g * vector}..{g * vector + vector - 1}, input features "
                f"{j * m}..{j * m + m - 1} keep {int(counts[g, j])}, expected {n}"
            )
        group_mask = groups[:, 0]
        kept = _positions(group_mask, n)
        kept_values = weight.gather(1, _columns(kept, m).repeat_interleave(vector, 0))
        if not bool(torch.isfinite(kept_values).all()):
            raise ValueError("weight: kept entries must be finite, found NaN or Inf")
        stored = kept if n <= m - n else _positions(~group_mask, m - n)
        return cls(kept_values.contiguous(), stored.to(OFFSET_DTYPE), pattern, vector, weight.shape)

    def kept_offsets(self) -> torch.Tensor:
        """uint8 ``[N // V, K // m * n]``, contiguous: kept positions within each group of m, ascending. Derived
        once per ``offsets`` tensor (and its storage) and kept, since every product reads it; while torch.compile
        traces, derived in the graph (a traced storage address cannot key a cache), and derived on every call for
        offsets without values (meta or fake)."""
        offsets = self.offsets
        if torch.compiler.is_compiling():
            return self._derive_kept_offsets()
        cache = self._kept_offsets_cache
        if cache is None or cache[0] is not offsets or cache[1] != offsets.data_ptr():
            kept = self._derive_kept_offsets()
            if not holds_values(offsets):  # no storage address to key a cache
                return kept
            cache = (offsets, offsets.data_ptr(), kept)
            self._kept_offsets_cache = cache
        return cache[2]

    def _derive_kept_offsets(self) -> torch.Tensor:
        offsets = self.offsets
        if self.stores_dropped:
            dropped = torch.zeros(*offsets.shape[:2], self.m, dtype=torch.bool, device=self.device)
            dropped.scatter_(2, offsets.long(), True)
            kept = _positions(~dropped, self.n).to(OFFSET_DTYPE)
        else:
            kept = offsets
        return kept.reshape(offsets.shape[0], -1).contiguous()

    def kept_columns(self) -> torch.Tensor:
        """int64 ``[N // V, K // m * n]``: the input features each V-group keeps, ascending."""
        return _columns(self.kept_offsets().view(self.offsets.shape[0], -1, self.n).long(), self.m)

    def mask(self) -> torch.Tensor:
        """bool ``[N, K]``: True where the weight is kept."""
        out = torch.zeros(self.shape, dtype=torch.bool, device=self.device)
        return out.scatter_(1, self.kept_columns().repeat_interleave(self.vector, 0), True)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[N, K]`` weight, zeros where pruned."""
        return dense_from_kept(self.values, self.kept_offsets(), self.n, self.m, self.vector)

    STATE_TENSORS = ("values", "offsets")
    STATE_FIELDS = ("pattern", "vector", "shape", "dtype")

    @classmethod
    def placeholder_indices(cls, values: torch.Tensor, fields: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``offsets`` of the placeholder structure: every V-group keeps the first n of every m input features."""
        n, m = parse_pattern(fields["pattern"])
        vector = check_vector(fields["vector"])
        rows, cols = check_shape(fields["shape"])
        stored = torch.arange(n, m) if n > m - n else torch.arange(n)
        offsets = stored.to(device=values.device, dtype=OFFSET_DTYPE).expand(rows // vector, cols // m, -1)
        return {"offsets": offsets.contiguous()}

    def state_fields(self) -> dict[str, Any]:
        """The JSON-able fields that, with :meth:`state_tensors`, rebuild this weight."""
        dtype = str(self.dtype).removeprefix("torch.")
        return {"pattern": self.pattern, "vector": self.vector, "shape": list(self.shape), "dtype": dtype}

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], fields: dict[str, Any], *, allow_nonfinite: bool = False
    ) -> "NMSparseWeight":
        """Rebuild (and so validate) a weight from :meth:`state_tensors` and :meth:`state_fields`."""
        check_state_dtype(tensors["values"], fields["dtype"])
        return cls(
            tensors["values"], tensors["offsets"], fields["pattern"], fields["vector"], fields["shape"],
            allow_nonfinite=allow_nonfinite,
        )

    def __reduce__(self) -> tuple[Callable[..., NMSparseWeight], tuple[Any, ...]]:
        """Pickle as a call to the constructor's arguments, so unpickling (also torch.load's weights-only
        mode) always goes through :meth:`validate`."""
        args = (self.values, self.offsets, self.pattern, self.vector, tuple(self.shape), self.state_checksums())
        return _rebuild_nm_sparse_weight, args

    def __repr__(self) -> str:
        return (
            f"NMSparseWeight(shape={tuple(self.shape)}, pattern='{self.pattern}', vector={self.vector}, "
            f"dtype={self.dtype}, device={self.device}, nbytes={self.nbytes})"
        )


def dense_from_kept(values: torch.Tensor, kept_offsets: torch.Tensor, n: int, m: int, vector: int) -> torch.Tensor:
    """The dense ``[N, K]`` weight from ``values`` ``[N, K // m * n]`` and their uint8 ``kept_offsets``
    ``[N // V, K // m * n]`` (as :meth:`NMSparseWeight.kept_offsets` gives them), zeros where pruned; unchecked."""
    out = values.new_zeros((values.shape[0], kept_offsets.shape[1] // n * m))
    return out.scatter_(1, kept_row_columns(kept_offsets, n, m, vector), values)


def kept_row_columns(kept_offsets: torch.Tensor, n: int, m: int, vector: int) -> torch.Tensor:
    """int64 ``[N, K // m * n]``: the input feature of every kept value, from uint8 ``kept_offsets``."""
    groups = kept_offsets.shape[0]
    return _columns(kept_offsets.view(groups, -1, n), m).repeat_interleave(vector, 0)


def _positions(group_mask: torch.Tensor, count: int) -> torch.Tensor:
    """int64 ascending positions of the True entries in each last-dimension group (exactly ``count`` each): a
    stable sort puts them first in their order, with shapes that do not depend on the values (so that offsets
    without values, on the meta device or fake, derive too)."""
    order = torch.sort(group_mask.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    return order[..., :count]


def _columns(offsets: torch.Tensor, m: int) -> torch.Tensor:
    """Absolute input features from ``[G, K // m, c]`` offsets within groups, flattened to ``[G, K // m * c]``."""
    group_start = torch.arange(offsets.shape[1], device=offsets.device).view(1, -1, 1) * m
    return (offsets.long() + group_start).view(offsets.shape[0], -1)


def _rebuild_nm_sparse_weight(
    values: torch.Tensor, offsets: torch.Tensor, pattern: str, vector: int, shape: tuple[int, int],
    checksums: dict[str, int] | None = None,
) -> NMSparseWeight:
    """Unpickling entry point: the constructor, which validates everything a file may have tampered with, then
    the saved checksums, which catch a change that still validates (pickles written before them have none)."""
    weight = NMSparseWeight(values, offsets, pattern, vector, shape)
    weight.verify_state_checksums(checksums, "the pickled NMSparseWeight")
    return weight


# torch.load(weights_only=True) may call only allowlisted functions. The class itself is deliberately not
# allowlisted: that would let a crafted file build an instance through __new__ alone, skipping validation.
torch.serialization.add_safe_globals([_rebuild_nm_sparse_weight])
