"""Vector-wise N:M weights with 8-bit kept values: float8_e4m3fn or int8, one fp32 scale per output feature.

On decode the weight bytes are the time; 8-bit values halve the values' bytes of a bf16 N:M weight. The
products dequantize in registers (the values are exact in bf16 and fp16) and apply each output feature's scale
to its accumulated sum, so the result is the product with the dequantized weight ``values * scales[:, None]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .nm import NMSparseWeight, dense_from_kept
from .pattern import SUPPORTED_DTYPES, check_shape, dtype_name, holds_values

QUANTIZED_DTYPES = (torch.float8_e4m3fn, torch.int8)
# The largest magnitude each dtype holds: a row's largest kept value is scaled to it.
QUANTIZED_MAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
SCALE_DTYPE = torch.float32


def check_quantized_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    """``dtype`` if it is one of :data:`QUANTIZED_DTYPES`; a TypeError that names ``name`` otherwise."""
    if dtype not in QUANTIZED_DTYPES:
        raise TypeError(f"{name}: expected torch.float8_e4m3fn or torch.int8, got {dtype}")
    return dtype  # type: ignore[return-value]


def quantize_rows(values: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``values`` ``[N, J]`` (float) to ``dtype`` with one fp32 scale per row, the row's largest
    magnitude over the dtype's (:data:`QUANTIZED_MAX`; rows of zeros take scale 1): (quantized values, scales).
    int8 rounds to nearest; float8_e4m3fn rounds as torch's cast does."""
    check_quantized_dtype(dtype)
    peak = QUANTIZED_MAX[dtype]
    wide = values.to(SCALE_DTYPE)
    largest = wide.abs().amax(dim=1) if wide.shape[1] else wide.new_zeros(wide.shape[0])
    scales = torch.where(largest > 0, largest / peak, torch.ones_like(largest))
    scaled = (wide / scales[:, None]).clamp(-peak, peak)
    quantized = scaled.round().to(dtype) if dtype == torch.int8 else scaled.to(dtype)
    return quantized.contiguous(), scales.contiguous()


class QuantizedNMWeight(NMSparseWeight):
    """A pruned ``[N, K]`` weight in vector-wise N:M form (the structure of :class:`NMSparseWeight`) whose kept
    values are 8-bit: ``weight[r, k] = values[r, j] * scales[r]`` at the kept positions.

    * ``values``: ``[N, K // m * n]`` in float8_e4m3fn or int8;
    * ``offsets``: as :class:`NMSparseWeight`;
    * ``scales``: fp32 ``[N]``, finite and positive.

    ``dtype`` is the dtype its products take and return (that of the weight it was quantized from); ``to_dense``
    gives the dequantized weight in it. Made by :meth:`NMSparseWeight.quantize`; it has no gradient.
    """

    def __init__(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        scales: torch.Tensor,
        pattern: str,
        vector: int,
        shape: tuple[int, int] | torch.Size,
        dtype: torch.dtype,
    ) -> None:
        self._assign_quantized(values, offsets, scales, pattern, vector, shape, dtype)
        self.validate()
        self.check_storage()

    @classmethod
    def _trusted_quantized(
        cls,
        values: torch.Tensor,
        offsets: torch.Tensor,
        scales: torch.Tensor,
        pattern: str,
        vector: int,
        shape: tuple[int, int] | torch.Size,
        dtype: torch.dtype,
        kept_offsets: torch.Tensor | None = None,
        kept_bits: torch.Tensor | None = None,
    ) -> QuantizedNMWeight:
        """Wrap tensors already validated together, skipping :meth:`validate` (which synchronizes a GPU). For
        modules only."""
        weight = cls.__new__(cls)
        weight._assign_quantized(values, offsets, scales, pattern, vector, shape, dtype, kept_offsets, kept_bits)
        return weight

    def _assign_quantized(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        scales: torch.Tensor,
        pattern: str,
        vector: int,
        shape: tuple[int, int] | torch.Size,
        dtype: torch.dtype,
        kept_offsets: torch.Tensor | None = None,
        kept_bits: torch.Tensor | None = None,
    ) -> None:
        """:meth:`NMSparseWeight._assign`, and the scales and the products' dtype; nothing is checked."""
        self._assign(values, offsets, pattern, vector, shape, kept_offsets, kept_bits)
        self.scales = scales
        self._dtype = dtype

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, mask: torch.Tensor, pattern: str, vector: int = 1
    ) -> QuantizedNMWeight:
        """Refused: quantize an :class:`NMSparseWeight` instead (``NMSparseWeight.from_dense(...).quantize(dtype)``)."""
        raise TypeError(
            "QuantizedNMWeight.from_dense: build the NMSparseWeight first, then quantize it: "
            "NMSparseWeight.from_dense(weight, mask, pattern, vector).quantize(dtype)"
        )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the products and of :meth:`to_dense` (the values are stored in :attr:`values_dtype`)."""
        return self._dtype

    @property
    def values_dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: values + offsets + scales + metadata (pattern, vector and shape as five int64)."""
        return (
            self.values.numel() * self.values.element_size() + self.offsets.numel()
            + self.scales.numel() * self.scales.element_size() + 5 * 8
        )

    def _check_values(self) -> None:
        if not isinstance(self.values, torch.Tensor) or self.values.dtype not in QUANTIZED_DTYPES:
            got = self.values.dtype if isinstance(self.values, torch.Tensor) else type(self.values).__name__
            raise TypeError(f"values: expected a float8_e4m3fn or int8 tensor, got {got}")
        if self._dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype: expected float16, bfloat16 or float32 for the products, got {self._dtype}")
        scales = self.scales
        if not isinstance(scales, torch.Tensor) or scales.dtype != SCALE_DTYPE:
            got = scales.dtype if isinstance(scales, torch.Tensor) else type(scales).__name__
            raise TypeError(f"scales: expected a float32 tensor, got {got}")
        if tuple(scales.shape) != (self.shape[0],):
            raise ValueError(f"scales: expected shape ({self.shape[0]},), one per output feature, got "
                             f"{tuple(scales.shape)}")
        if scales.device != self.values.device:
            raise ValueError(f"scales: on {scales.device}, but values are on {self.values.device}")
        if self.values.dtype == torch.int8 and holds_values(self.values) and self.values.numel():
            if bool((self.values == -128).any()):
                raise ValueError("values: int8 values must lie in [-127, 127] (symmetric), found -128")

    def check_storage(self, allow_nonfinite: bool = False) -> None:
        """As :meth:`SparseWeightBase.check_storage` (no overlapping elements), and always finite values and
        finite, positive scales: a quantized weight never holds NaN or Inf."""
        super().check_storage(allow_nonfinite=True)
        if self.shape_only:
            return
        if self.values.numel() and not bool(torch.isfinite(self.values.to(SCALE_DTYPE)).all()):
            raise ValueError("values: expected finite values, found NaN or infinite")
        if not bool((torch.isfinite(self.scales) & (self.scales > 0)).all()):
            raise ValueError("scales: expected finite, positive scales, found zero, negative, NaN or infinite ones")

    def dequantized_values(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``values * scales[:, None]`` ``[N, K // m * n]``, computed in fp32 and returned in ``dtype`` (by default
        :attr:`dtype`)."""
        wide = self.values.to(SCALE_DTYPE) * self.scales[:, None]
        return wide.to(self._dtype if dtype is None else dtype)

    def to_dense(self) -> torch.Tensor:
        """The dequantized dense ``[N, K]`` weight in :attr:`dtype`, zeros where pruned."""
        return dense_from_kept(self.dequantized_values(), self.kept_offsets(), self.n, self.m, self.vector)

    def dequantize(self) -> NMSparseWeight:
        """The same structure with the dequantized values in :attr:`dtype`, as an :class:`NMSparseWeight`."""
        return NMSparseWeight(self.dequantized_values(), self.offsets, self.pattern, self.vector, self.shape)

    def quantize(self, dtype: torch.dtype) -> QuantizedNMWeight:
        """Refused: the values are already quantized (quantize the unquantized weight instead)."""
        raise TypeError(
            f"quantize: this weight is already quantized to {self.values.dtype}; call quantize on the "
            "unquantized NMSparseWeight (dequantize() gives one back, with the rounding already done)"
        )

    STATE_TENSORS = ("values", "offsets", "scales")
    STATE_FIELDS = ("pattern", "vector", "shape", "dtype", "values_dtype")

    @classmethod
    def placeholder_indices(cls, values: torch.Tensor, fields: dict[str, Any]) -> dict[str, torch.Tensor]:
        """As :meth:`NMSparseWeight.placeholder_indices`, with unit scales."""
        rows = check_shape(fields["shape"])[0]
        scales = torch.ones(rows, dtype=SCALE_DTYPE, device=values.device)
        return {**super().placeholder_indices(values, fields), "scales": scales}

    @classmethod
    def placeholder(cls, values: torch.Tensor, fields: dict[str, Any]) -> QuantizedNMWeight:
        """A weight over 8-bit ``values`` of the placeholder structure; ``fields`` name the products' ``dtype``."""
        tensors = {"values": values, **cls.placeholder_indices(values, fields)}
        return cls.from_state(tensors, {**fields, "values_dtype": dtype_name(values.dtype)})

    def state_fields(self) -> dict[str, Any]:
        return {**super().state_fields(), "values_dtype": dtype_name(self.values.dtype)}

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], fields: dict[str, Any], *, allow_nonfinite: bool = False
    ) -> QuantizedNMWeight:
        """Rebuild (and so validate) a weight from :meth:`state_tensors` and :meth:`state_fields`; non-finite
        values are never accepted."""
        values = tensors["values"]
        stored = {dtype_name(dtype): dtype for dtype in QUANTIZED_DTYPES}.get(fields.get("values_dtype"))
        if not isinstance(values, torch.Tensor) or stored != values.dtype:
            got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"values_dtype: metadata says {fields.get('values_dtype')!r}, but the stored values "
                             f"are {got}")
        dtype = {dtype_name(d): d for d in SUPPORTED_DTYPES}.get(fields.get("dtype"))
        if dtype is None:
            raise ValueError(f"dtype: expected 'float16', 'bfloat16' or 'float32', got {fields.get('dtype')!r}")
        return cls(values, tensors["offsets"], tensors["scales"], fields["pattern"], fields["vector"],
                   fields["shape"], dtype)

    def to(self, *args: Any, **kwargs: Any) -> QuantizedNMWeight:
        """Move to a device (every tensor) and/or set the products' float dtype; the stored values keep theirs.
        A validated copy."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype: expected float16, bfloat16 or float32 for the products, got {dtype}")
        tensors = {
            name: tensor if device is None else tensor.to(device, non_blocking=non_blocking)
            for name, tensor in self.state_tensors().items()
        }
        fields = {**self.state_fields(), "dtype": dtype_name(self._dtype if dtype is None else dtype)}
        return type(self).from_state(tensors, fields)

    def __reduce__(self) -> tuple[Callable[..., QuantizedNMWeight], tuple[Any, ...]]:
        """Pickle as a call to the constructor's arguments, so unpickling always validates."""
        args = (
            self.values, self.offsets, self.scales, self.pattern, self.vector, tuple(self.shape),
            dtype_name(self._dtype), self.state_checksums(),
        )
        return _rebuild_quantized_nm_weight, args

    def __repr__(self) -> str:
        return (
            f"QuantizedNMWeight(shape={tuple(self.shape)}, pattern='{self.pattern}', vector={self.vector}, "
            f"values_dtype={self.values.dtype}, dtype={self._dtype}, device={self.device}, nbytes={self.nbytes})"
        )


def quantize_nm(weight: NMSparseWeight, dtype: torch.dtype) -> QuantizedNMWeight:
    """``weight``'s kept values quantized to ``dtype`` per output feature (:func:`quantize_rows`), its structure
    shared. The values are detached: a quantized weight has no gradient."""
    check_quantized_dtype(dtype)
    values, scales = quantize_rows(weight.values.detach(), dtype)
    return QuantizedNMWeight(values, weight.offsets, scales, weight.pattern, weight.vector, weight.shape, weight.dtype)


def _rebuild_quantized_nm_weight(
    values: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor, pattern: str, vector: int,
    shape: tuple[int, int], dtype: str, checksums: dict[str, int] | None = None,
) -> QuantizedNMWeight:
    """Unpickling entry point: the validating constructor, then the saved checksums."""
    products = {dtype_name(d): d for d in SUPPORTED_DTYPES}.get(dtype)
    if products is None:
        raise ValueError(f"dtype: expected 'float16', 'bfloat16' or 'float32', got {dtype!r}")
    weight = QuantizedNMWeight(values, offsets, scales, pattern, vector, shape, products)
    weight.verify_state_checksums(checksums, "the pickled QuantizedNMWeight")
    return weight


torch.serialization.add_safe_globals([_rebuild_quantized_nm_weight])
