"""Modules: drop-ins for ``nn.Linear`` with a sparse weight (:class:`SparseLinear` for vector-wise N:M,
:class:`CSRLinear` and :class:`BitmapLinear` for unstructured, :class:`BlockShuffledLinear` for block-sparse after a
row permutation), and :func:`sparsify`, which swaps a model's ``nn.Linear`` layers for them in place."""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from . import ops
from .kernels.nm_element import kept_bits
from .progress import progress as draw_progress
from .formats import BitmapWeight, BlockShuffledWeight, CSRWeight, NMSparseWeight, QuantizedNMWeight
from .formats.base import SparseWeightBase
from .formats.pattern import (
    SUPPORTED_DTYPES, check_vector, check_weight_matrix, dtype_name, holds_values, parse_pattern,
)
from .formats.quantized import check_quantized_dtype
from .formats.block_shuffled import check_block, check_block_weight, descending_block_count_order
from .prune import (
    collect_input_norms,
    prune,
    prune_bitmap,
    prune_block_shuffled,
    prune_csr,
    prune_sequentially,
    sparsegpt,
    sparsegpt_block_shuffled,
    sparsegpt_csr,
    wanda_csr_mask,
    wanda_mask,
    wanda_scores,
)
from .prune.block_shuffle import check_block_sparsity
from .prune.magnitude import check_finite
from .prune.sparsegpt import DAMPING, step_columns
from .prune.unstructured import check_sparsity

METHODS = ("magnitude", "wanda", "sparsegpt")


class _SparseLinearBase(nn.Module):
    """What the sparse linear modules share: the weight's kept values as the Parameter ``values`` (so any
    optimizer fine-tunes them under the fixed structure), its index tensors as buffers (saved in the state
    dict and validated as one weight when loaded), an optional bias, and the product through
    :func:`nmspmm.linear`. Subclasses name the format and build its weight from these tensors."""

    FORMAT: type
    values: nn.Parameter
    bias: nn.Parameter | None
    # Stored tensors whose dtype no module cast changes (buffers moved by :meth:`_move_held`).
    HELD: tuple[str, ...] = ()

    def __init__(
        self, weight: SparseWeightBase, bias: torch.Tensor | None = None, *, backend: str = "auto"
    ) -> None:
        super().__init__()
        if not isinstance(weight, self.FORMAT):
            raise TypeError(f"weight: expected an nmspmm.{self.FORMAT.__name__}, got {type(weight).__name__}")
        ops.check_bias(bias, weight)
        ops.check_backend(backend)
        self.out_features, self.in_features = weight.shape
        self.backend = backend
        self.fields = {key: value for key, value in weight.state_fields().items() if key != "dtype"}
        tensors = weight.state_tensors()
        if "values" in self.HELD:
            self.register_buffer("values", tensors.pop("values").detach())
        else:
            self.values = nn.Parameter(tensors.pop("values").detach())
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach())

    @classmethod
    def of(cls, weight: SparseWeightBase, linear: nn.Linear, *, backend: str = "auto") -> _SparseLinearBase:
        """The module that replaces ``linear`` with the pruned ``weight``: ``linear``'s bias copied, and both
        keeping ``linear``'s ``requires_grad``."""
        _check_linear(linear)
        return _like(cls(weight, _bias_copy(linear), backend=backend), linear)

    @property
    def weight(self) -> SparseWeightBase:
        """The sparse weight over this module's tensors (validated when they were built or loaded, not again)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self._launch_weight(), self.bias, backend=self.backend)

    def _launch_weight(self) -> SparseWeightBase:
        """:attr:`weight`, built once and kept until the module moves, loads or gets a new ``values`` tensor, so
        that what the products derive from it (their launch plan) is derived once too."""
        if torch.compiler.is_compiling():
            return self.weight
        view = self.__dict__.get("_weight_view")
        if view is None or view.values is not self.values:
            view = self.weight
            self.__dict__["_weight_view"] = view
        return view

    def __setattr__(self, name: str, value: Any) -> None:
        """As ``nn.Module``'s; a stored tensor given anew (``module.offsets = ...``) also drops the weight view and
        what derives from the stored tensors (derived again), which would describe the tensor it replaced."""
        super().__setattr__(name, value)
        if name in type(self).FORMAT.STATE_TENSORS and "_weight_view" in self.__dict__:
            del self.__dict__["_weight_view"]
            self._derive()

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> _SparseLinearBase:
        self.__dict__.pop("_weight_view", None)
        shape_only = not holds_values(self.values)
        held = {name: self._buffers.pop(name) for name in self.HELD}
        try:
            module = super()._apply(fn, recurse)
        finally:
            self._buffers.update(held)
        if held:
            self._move_held(fn)
        if shape_only and holds_values(self.values):
            self._hold_placeholder()
        return module

    def _move_held(self, fn: Callable[..., Any]) -> None:
        """Move the :attr:`HELD` buffers as ``fn`` (a module move or cast) moves the others, keeping their dtypes."""

    def _products_dtype(self, values: torch.Tensor) -> str:
        """The ``dtype`` field of this module's weight when it holds ``values`` (that of the values here)."""
        return str(values.dtype).removeprefix("torch.")

    def _hold_placeholder(self) -> None:
        """Fill the index tensors that ``to_empty`` leaves uninitialised, when it moves the module off the meta
        device, with the format's placeholder structure (:meth:`SparseWeightBase.placeholder_indices`), and derive
        again: until real weights load, the module is a valid weight of uninitialised values whose products read
        no index out of bounds."""
        with torch.no_grad():
            for name, tensor in self.FORMAT.placeholder_indices(self.values, self.fields).items():
                getattr(self, name).copy_(tensor)
        self._derive()

    def to_dense(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight, zeros where pruned."""
        return self.weight.to_dense()

    def _describe_weight(self) -> str:
        return f"{self.FORMAT.__name__} with shape {(self.out_features, self.in_features)}"

    def _derive(self) -> None:
        """Recompute what the weight derives from its stored tensors (after a load)."""

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Check the incoming stored tensors (any may come from the module) as one weight of this module's
        format and shape, raising ValueError if they are not; load; derive again. Into a skeleton on the meta
        device, ``load_state_dict(..., assign=True)`` takes the incoming tensors themselves."""
        names = self.FORMAT.STATE_TENSORS
        tensors = {name: state_dict.get(prefix + name, getattr(self, name)) for name in names}
        values = tensors["values"]
        if isinstance(values, torch.Tensor):
            values = values.detach()
            # The module's own tensors join the incoming values' device, but a meta one has no values to move
            # (from_state then names the device mismatch).
            tensors = {
                name: t.to(values.device) if isinstance(t, torch.Tensor) and not t.is_meta else t
                for name, t in tensors.items()
            }
            tensors["values"] = values
        try:
            dtype = self._products_dtype(values) if isinstance(values, torch.Tensor) else None
            self.FORMAT.from_state(tensors, {**self.fields, "dtype": dtype})
        except (TypeError, ValueError, AttributeError) as error:
            stored = [prefix + name for name in names]
            listed = ", ".join(stored[:-1]) + " and " + stored[-1]
            raise ValueError(f"state_dict: {listed} are not a {self._describe_weight()}: {error}") from error
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self.__dict__.pop("_weight_view", None)
        self._derive()


class SparseLinear(_SparseLinearBase):
    """``y = x @ W.T + b`` with ``W`` stored in vector-wise N:M form, for ``x`` of shape ``[..., in_features]``.

    The kept weights are the Parameter ``values``, their positions the uint8 buffer ``offsets`` (saved in the
    state dict) and the derived ``kept_offsets`` and, for V = 1, ``kept_bits`` (the element-wise kernel's bitmap;
    not saved).
    """

    FORMAT = NMSparseWeight
    offsets: torch.Tensor
    kept_offsets: torch.Tensor
    kept_bits: torch.Tensor | None

    def __init__(self, weight: NMSparseWeight, bias: torch.Tensor | None = None, *, backend: str = "auto") -> None:
        """Wrap ``weight`` (sharing its tensors) and an optional ``[out_features]`` ``bias``; ``backend`` is
        passed to :func:`nmspmm.linear` on every call."""
        if isinstance(weight, QuantizedNMWeight) and type(self) is SparseLinear:
            raise TypeError("weight: a QuantizedNMWeight goes in a QuantizedSparseLinear, not a SparseLinear")
        super().__init__(weight, bias, backend=backend)
        self.pattern = weight.pattern
        self.vector = weight.vector
        _hold_derived(self, weight)

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        pattern: str,
        vector: int = 1,
        mask: torch.Tensor | None = None,
        *,
        backend: str = "auto",
    ) -> SparseLinear:
        """Prune ``linear``'s weight to ``pattern`` with V=``vector`` (magnitude pruning, or the N:M ``mask``
        given) into a new module; weight and bias are copied, and keep their ``requires_grad``."""
        _check_linear(linear)
        dense = linear.weight.detach()
        if mask is None:
            weight = prune(dense, pattern, vector)
        else:
            weight = NMSparseWeight.from_dense(dense, mask, pattern, vector)
        return cls.of(weight, linear, backend=backend)

    @property
    def weight(self) -> NMSparseWeight:
        """The sparse weight as an :class:`NMSparseWeight` over this module's tensors (validated when they
        were built or loaded, not again)."""
        shape = (self.out_features, self.in_features)
        return NMSparseWeight._trusted(
            self.values, self.offsets, self.pattern, self.vector, shape, _kept_offsets_held(self), self.kept_bits
        )

    def _describe_weight(self) -> str:
        return f"{self.pattern} weight with vector={self.vector} and shape {(self.out_features, self.in_features)}"

    def _derive(self) -> None:
        shape = (self.out_features, self.in_features)
        _hold_derived(self, NMSparseWeight._trusted(self.values, self.offsets, self.pattern, self.vector, shape))

    def extra_repr(self) -> str:
        backend = f", backend='{self.backend}'" if self.backend != "auto" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern='{self.pattern}', "
            f"vector={self.vector}, bias={self.bias is not None}{backend}"
        )


class QuantizedSparseLinear(_SparseLinearBase):
    """``y = x @ W.T + b`` with ``W`` a :class:`QuantizedNMWeight`: vector-wise N:M with 8-bit kept values
    (float8_e4m3fn or int8) and one fp32 scale per output feature, for inference: gradients reach the activations
    and the bias, not the quantized values.

    ``values`` (8-bit), ``offsets`` and ``scales`` are buffers (saved in the state dict); ``kept_offsets`` (and for
    V = 1 ``kept_bits``) are derived (not saved). ``dtype`` is the products' dtype: a float cast of the module
    (``.half()``, ``.to(torch.bfloat16)``) sets it, while the stored values and scales keep theirs.
    """

    FORMAT = QuantizedNMWeight
    HELD = ("values", "scales")
    offsets: torch.Tensor
    scales: torch.Tensor
    kept_offsets: torch.Tensor
    kept_bits: torch.Tensor | None

    def __init__(
        self, weight: QuantizedNMWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
    ) -> None:
        """Wrap ``weight`` (sharing its tensors) and an optional ``[out_features]`` ``bias`` of its dtype."""
        super().__init__(weight, bias, backend=backend)
        self.pattern = weight.pattern
        self.vector = weight.vector
        self.dtype = weight.dtype
        _hold_derived(self, weight)

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        pattern: str,
        vector: int = 1,
        weight_dtype: torch.dtype = torch.float8_e4m3fn,
        *,
        backend: str = "auto",
    ) -> QuantizedSparseLinear:
        """Prune ``linear``'s weight to ``pattern`` with V=``vector`` by magnitude and quantize the kept values to
        ``weight_dtype``; the bias is copied."""
        _check_linear(linear)
        weight = prune(linear.weight.detach(), pattern, vector).quantize(weight_dtype)
        return cls.of(weight, linear, backend=backend)

    @property
    def weight(self) -> QuantizedNMWeight:
        """The weight as a :class:`QuantizedNMWeight` over this module's tensors (validated when they were built or
        loaded, not again)."""
        shape = (self.out_features, self.in_features)
        return QuantizedNMWeight._trusted_quantized(
            self.values, self.offsets, self.scales, self.pattern, self.vector, shape, self.dtype,
            _kept_offsets_held(self), self.kept_bits,
        )

    def _move_held(self, fn: Callable[..., Any]) -> None:
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.offsets.device))
        if probe.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype: the products of a QuantizedSparseLinear take float16, bfloat16 or float32, "
                            f"got {probe.dtype}")
        self.dtype = probe.dtype
        for name in self.HELD:
            tensor = self._buffers[name]
            if tensor.device != probe.device:
                moved = torch.empty_like(tensor, device=probe.device) if tensor.is_meta else tensor.to(probe.device)
                self._buffers[name] = moved

    def _products_dtype(self, values: torch.Tensor) -> str:
        return dtype_name(self.dtype)

    def _describe_weight(self) -> str:
        return (f"{self.pattern} weight with vector={self.vector}, {self.fields['values_dtype']} values and shape "
                f"{(self.out_features, self.in_features)}")

    def _derive(self) -> None:
        shape = (self.out_features, self.in_features)
        _hold_derived(self, QuantizedNMWeight._trusted_quantized(
            self.values, self.offsets, self.scales, self.pattern, self.vector, shape, self.dtype
        ))

    def extra_repr(self) -> str:
        backend = f", backend='{self.backend}'" if self.backend != "auto" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern='{self.pattern}', "
            f"vector={self.vector}, values={self.fields['values_dtype']}, dtype={dtype_name(self.dtype)}, "
            f"bias={self.bias is not None}{backend}"
        )


class _UnstructuredLinear(_SparseLinearBase):
    """What the unstructured modules share (:class:`CSRLinear`, :class:`BitmapLinear`): any mask, pruned by
    magnitude with the format's pruning function :attr:`PRUNE` (or the mask given), and the structures the products
    derive from the stored tensors cached on the module until it moves or loads."""

    FORMAT: type[CSRWeight] | type[BitmapWeight]
    PRUNE: ClassVar[Callable[[torch.Tensor, float], CSRWeight | BitmapWeight]]

    def __init__(
        self, weight: CSRWeight | BitmapWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
    ) -> None:
        super().__init__(weight, bias, backend=backend)
        self._derived: dict[str, Any] = {}

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, sparsity: float, mask: torch.Tensor | None = None, *, backend: str = "auto"
    ) -> _UnstructuredLinear:
        """Prune ``linear``'s weight by magnitude to ``sparsity`` (or keep the ``mask`` given) into a new module."""
        _check_linear(linear)
        dense = linear.weight.detach()
        weight = cls.PRUNE(dense, sparsity) if mask is None else cls.FORMAT.from_dense(dense, mask)
        return cls.of(weight, linear, backend=backend)

    @property
    def weight(self) -> CSRWeight | BitmapWeight:
        # Both formats' _trusted take the stored tensors in STATE_TENSORS order, then the shape and the cache.
        stored = (getattr(self, name) for name in self.FORMAT.STATE_TENSORS)
        return self.FORMAT._trusted(*stored, (self.out_features, self.in_features), self._derived)

    def _derive(self) -> None:
        self._derived = {}

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> _UnstructuredLinear:
        self._derived = {}
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.values.numel()}, "
            f"bias={self.bias is not None}"
        )


class CSRLinear(_UnstructuredLinear):
    """``y = x @ W.T + b`` with ``W`` unstructured sparse in CSR form (:class:`CSRWeight`): kept values as the
    Parameter ``values``, int32 buffers ``col_indices`` and ``row_offsets``. The structures the kernels derive
    (launch order, transposed structure for gradients) are cached on the module until it moves or loads."""

    FORMAT = CSRWeight
    PRUNE = staticmethod(prune_csr)
    col_indices: torch.Tensor
    row_offsets: torch.Tensor


class BitmapLinear(_UnstructuredLinear):
    """``y = x @ W.T + b`` with ``W`` unstructured sparse as a bitmap (:class:`BitmapWeight`, the layout the
    tensor-core kernel reads): kept values as the Parameter ``values``, int32 buffers ``bitmap`` and
    ``block_offsets``. The structures the products derive (coordinates and transposed bitmap for gradients) are
    cached on the module until it moves or loads."""

    FORMAT = BitmapWeight
    PRUNE = staticmethod(prune_bitmap)
    bitmap: torch.Tensor
    block_offsets: torch.Tensor


class BlockShuffledLinear(_SparseLinearBase):
    """``y = x @ W.T + b`` with ``W`` block-sparse after a row permutation (:class:`BlockShuffledWeight`): kept
    blocks as the Parameter ``values``, int32 buffers ``block_columns``, ``block_row_offsets`` and
    ``row_permutation``, and the derived launch order ``block_row_order`` (not saved)."""

    FORMAT = BlockShuffledWeight
    block_columns: torch.Tensor
    block_row_offsets: torch.Tensor
    row_permutation: torch.Tensor
    block_row_order: torch.Tensor

    def __init__(
        self, weight: BlockShuffledWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
    ) -> None:
        super().__init__(weight, bias, backend=backend)
        self.block = tuple(weight.block)
        self.register_buffer("block_row_order", weight.block_row_order, persistent=False)

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        sparsity: float,
        block: tuple[int, int] = (32, 32),
        *,
        search: bool = True,
        backend: str = "auto",
    ) -> BlockShuffledLinear:
        """Prune ``linear``'s weight to whole ``block`` tiles after a searched row permutation into a new module."""
        _check_linear(linear)
        weight = prune_block_shuffled(linear.weight.detach(), sparsity, block, search=search)
        return cls.of(weight, linear, backend=backend)

    @property
    def weight(self) -> BlockShuffledWeight:
        return BlockShuffledWeight._trusted(
            self.values, self.block_columns, self.block_row_offsets, self.row_permutation,
            (self.out_features, self.in_features), self.block, self.block_row_order,
        )

    def _derive(self) -> None:
        self.block_row_order = descending_block_count_order(self.block_row_offsets)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
            f"blocks={self.block_columns.numel()}, bias={self.bias is not None}"
        )


SPARSE_MODULES = (SparseLinear, QuantizedSparseLinear, CSRLinear, BitmapLinear, BlockShuffledLinear)
"""The modules that hold a sparse weight, one per format."""


def _hold_derived(module: SparseLinear | QuantizedSparseLinear, weight: NMSparseWeight) -> None:
    """Keep (or refresh) on an N:M module what its weight derives, as buffers that are not saved: the kept
    offsets, and for V = 1 the element-wise kernel's bitmap (kept so that a compiled forward takes it as an input
    instead of deriving it on every call; None otherwise)."""
    bitmap = None if weight.vector != 1 else kept_bits(weight.kept_offsets(), weight.n, weight.m, weight.shape[1])
    module.register_buffer("kept_offsets", weight.kept_offsets(), persistent=False)
    module.register_buffer("kept_bits", bitmap, persistent=False)


def _kept_offsets_held(module: SparseLinear | QuantizedSparseLinear) -> torch.Tensor | None:
    """An N:M module's kept offsets for its weight view; None while torch.compile traces, which derives them in
    the graph anyway (:meth:`NMSparseWeight.kept_offsets`), so that the compiled forward neither guards the buffer
    nor takes it as an input."""
    return None if torch.compiler.is_compiling() else module.kept_offsets


def _check_linear(linear: Any) -> None:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")


def _bias_copy(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().clone()


def _like(module: _SparseLinearBase, linear: nn.Linear) -> _SparseLinearBase:
    """``module`` with the ``requires_grad`` of ``linear``'s weight (values that are a Parameter) and bias."""
    if isinstance(module.values, nn.Parameter):
        module.values.requires_grad_(linear.weight.requires_grad)
    if module.bias is not None:
        module.bias.requires_grad_(linear.bias.requires_grad)
    return module


@dataclass
class SparsifyReport:
    """What :func:`sparsify` did: the layers swapped, those skipped (name -> reason), and the weight bytes of the
    swapped layers before (dense) and after (values + offsets + metadata)."""

    pattern: str
    vector: int
    method: str
    sparsity: float | None = None
    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    dense_bytes: int = 0
    sparse_bytes: int = 0

    def __str__(self) -> str:
        lines = [
            f"sparsify {self.pattern} ({self._settings()}): "
            f"{len(self.swapped)} linear layers swapped, {len(self.skipped)} skipped"
        ]
        if self.swapped:
            lines.append(
                f"  weights of the swapped layers: {_format_bytes(self.dense_bytes)} dense -> "
                f"{_format_bytes(self.sparse_bytes)} sparse ({self.sparse_bytes / self.dense_bytes:.1%})"
            )
            lines.append(f"  swapped: {_compact_names(self.swapped)}")
        lines += [f"  skipped {name or '<model>'}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)

    def _settings(self) -> str:
        if self.sparsity is None:
            return f"vector={self.vector}, {self.method}"
        return f"sparsity={self.sparsity:.1%}, {self.method}"


FORMATS = ("csr", "bitmap", "block")
"""The short forms of :func:`sparsify` besides ``"n:m"`` patterns."""
_FORMAT_NAMES = ", ".join(repr(name) for name in FORMATS[:-1]) + f" or {FORMATS[-1]!r}"


class SparsifyConfig:
    """How :func:`sparsify` swaps an ``nn.Linear``: the check that a layer fits, the module that replaces it,
    and what the report says. ``method`` says what calibration the pruning takes: none ("magnitude"), each
    layer's input-feature norms in :meth:`make` ("wanda"), or each layer's Gram matrix on the partly pruned model
    in :meth:`reconstruct` ("sparsegpt"). Subclass it for a format of your own; :func:`sparsify` takes any
    instance (one that overrides :meth:`make` alone prunes by magnitude)."""

    method = "magnitude"

    def fits(self, weight: torch.Tensor) -> None:
        """Raise TypeError or ValueError (the reason the layer is skipped) if ``weight`` cannot take this format."""
        raise NotImplementedError

    def prune(self, weight: torch.Tensor, input_norm: torch.Tensor | None = None) -> SparseWeightBase:
        """``weight`` pruned by magnitude, or by Wanda given the layer's ``input_norm``."""
        raise NotImplementedError

    def reconstruct(self, weight: torch.Tensor, gram: torch.Tensor) -> SparseWeightBase:
        """``weight`` pruned by SparseGPT given the Gram matrix ``gram`` of the layer's inputs."""
        raise NotImplementedError(f"{type(self).__name__} does not prune by SparseGPT")

    def module(self, weight: SparseWeightBase, linear: nn.Linear) -> nn.Module:
        """The module that replaces ``linear``, holding the pruned ``weight`` and a copy of ``linear``'s bias."""
        raise NotImplementedError

    def make(self, linear: nn.Linear, input_norm: torch.Tensor | None = None) -> nn.Module:
        """The module that replaces ``linear`` (see :meth:`prune`)."""
        return self.module(self.prune(linear.weight.detach(), input_norm), linear)

    def sparse_bytes(self, module: nn.Module) -> int:
        """Bytes of the replacement's weight (values, indices, metadata)."""
        return module.weight.nbytes

    def describe(self) -> dict[str, Any]:
        """The report's pattern, vector, method and sparsity."""
        raise NotImplementedError


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def _check_sparsegpt_settings(config: SparsifyConfig, run: int) -> None:
    """Refuse SparseGPT's ``damping`` or ``columns`` on a config of another method, or out of range (``run``: the
    columns a choice spans, of which ``columns`` must be a multiple)."""
    damping, columns = config.damping, config.columns
    if config.method != "sparsegpt" and (damping is not None or columns is not None):
        given = ", ".join(name for name, value in (("damping", damping), ("columns", columns)) if value is not None)
        raise ValueError(f"{given}: SparseGPT's settings, for method='sparsegpt' only; got method={config.method!r}")
    step_columns(DAMPING if damping is None else damping, columns, run)


def _sparsegpt_settings(config: SparsifyConfig) -> dict[str, Any]:
    """The config's SparseGPT keyword arguments (damping and columns; the functions' defaults where None)."""
    return {"damping": DAMPING if config.damping is None else config.damping, "columns": config.columns}


@dataclass(frozen=True)
class NMConfig(SparsifyConfig):
    """Vector-wise N:M (:class:`SparseLinear`): ``pattern`` ("n:m") with V=``vector``, pruned by ``method``
    ("magnitude"; "wanda" or "sparsegpt", which need calibration batches). SparseGPT's ``damping`` (a fraction
    of the Gram matrix's mean diagonal) and ``columns`` per step (a multiple of m) default to the reference
    procedure's, as in :func:`nmspmm.prune.sparsegpt`; the other configs take them too. ``weight_dtype``
    (``torch.float8_e4m3fn`` or ``torch.int8``) quantizes the kept values after pruning
    (:class:`QuantizedSparseLinear`, for inference)."""

    pattern: str
    vector: int = 1
    method: str = "magnitude"
    damping: float | None = None
    columns: int | None = None
    weight_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        _check_method(self.method)
        _, m = parse_pattern(self.pattern)
        check_vector(self.vector)
        _check_sparsegpt_settings(self, m)
        if self.weight_dtype is not None:
            check_quantized_dtype(self.weight_dtype, "weight_dtype")

    def fits(self, weight: torch.Tensor) -> None:
        n, m = parse_pattern(self.pattern)
        check_weight_matrix(weight, n, m, self.vector)

    def prune(self, weight: torch.Tensor, input_norm: torch.Tensor | None = None) -> NMSparseWeight:
        if input_norm is None:
            return self._quantized(prune(weight, self.pattern, self.vector))
        return self._quantized(NMSparseWeight.from_dense(
            weight, wanda_mask(weight, input_norm, self.pattern, self.vector), self.pattern, self.vector
        ))

    def reconstruct(self, weight: torch.Tensor, gram: torch.Tensor) -> NMSparseWeight:
        return self._quantized(sparsegpt(weight, gram, self.pattern, self.vector, **_sparsegpt_settings(self)))

    def _quantized(self, weight: NMSparseWeight) -> NMSparseWeight:
        return weight if self.weight_dtype is None else weight.quantize(self.weight_dtype)

    def module(self, weight: SparseWeightBase, linear: nn.Linear) -> nn.Module:
        if isinstance(weight, QuantizedNMWeight):
            return QuantizedSparseLinear.of(weight, linear)
        return SparseLinear.of(weight, linear)

    def describe(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "vector": self.vector, "method": self.method, "sparsity": None}


@dataclass(frozen=True)
class _UnstructuredConfig(SparsifyConfig):
    """What the unstructured configs share (:class:`CSRConfig`, :class:`BitmapConfig`): the ``sparsity`` fraction
    of weights pruned by ``method`` (the smallest |w| over the matrix; Wanda's smallest |w| * ||x|| in each row; or
    SparseGPT) into the format of :attr:`MODULE`, which the report names :attr:`PATTERN`."""

    MODULE: ClassVar[type[_UnstructuredLinear]]
    PATTERN: ClassVar[str]
    sparsity: float
    method: str = "magnitude"
    damping: float | None = None
    columns: int | None = None

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        _check_method(self.method)
        _check_sparsegpt_settings(self, 1)

    def fits(self, weight: torch.Tensor) -> None:
        check_weight_matrix(weight, 1, 1, 1)

    def prune(self, weight: torch.Tensor, input_norm: torch.Tensor | None = None) -> CSRWeight | BitmapWeight:
        if input_norm is None:
            return self.MODULE.PRUNE(weight, self.sparsity)
        return self.MODULE.FORMAT.from_dense(weight, wanda_csr_mask(weight, input_norm, self.sparsity))

    def reconstruct(self, weight: torch.Tensor, gram: torch.Tensor) -> CSRWeight | BitmapWeight:
        pruned = sparsegpt_csr(weight, gram, self.sparsity, **_sparsegpt_settings(self))
        if isinstance(pruned, self.MODULE.FORMAT):
            return pruned
        # SparseGPT's unstructured pass gives a CSRWeight: the same entries, in this config's format.
        return self.MODULE.FORMAT.from_dense(pruned.to_dense(), pruned.mask())

    def module(self, weight: SparseWeightBase, linear: nn.Linear) -> nn.Module:
        return self.MODULE.of(weight, linear)

    def describe(self) -> dict[str, Any]:
        return {"pattern": self.PATTERN, "vector": 1, "method": self.method, "sparsity": self.sparsity}


@dataclass(frozen=True)
class CSRConfig(_UnstructuredConfig):
    """Unstructured sparsity (:class:`CSRLinear`): the ``sparsity`` fraction of weights pruned by ``method``
    (the smallest |w| over the matrix; Wanda's smallest |w| * ||x|| in each row; or SparseGPT)."""

    MODULE: ClassVar[type[_UnstructuredLinear]] = CSRLinear
    PATTERN: ClassVar[str] = "csr"


@dataclass(frozen=True)
class BitmapConfig(_UnstructuredConfig):
    """Unstructured sparsity stored as a bitmap (:class:`BitmapLinear`): the entries :class:`CSRConfig` keeps
    (the ``sparsity`` fraction of weights pruned by ``method``: the smallest |w| over the matrix; Wanda's smallest
    |w| * ||x|| in each row; or SparseGPT), in the layout of the tensor-core kernel."""

    MODULE: ClassVar[type[_UnstructuredLinear]] = BitmapLinear
    PATTERN: ClassVar[str] = "bitmap"


@dataclass(frozen=True)
class BlockConfig(SparsifyConfig):
    """Block-sparse after a row permutation (:class:`BlockShuffledLinear`): whole ``block`` tiles pruned to
    ``sparsity`` by ``method`` (summed |w|, Wanda's summed |w| * ||x||, or SparseGPT's saliency), the permutation
    searched when ``search``."""

    sparsity: float
    block: tuple[int, int] = (32, 32)
    search: bool = True
    method: str = "magnitude"
    damping: float | None = None
    columns: int | None = None

    def __post_init__(self) -> None:
        check_block(self.block)
        check_block_sparsity(self.sparsity)
        _check_method(self.method)
        _check_sparsegpt_settings(self, self.block[1])

    def fits(self, weight: torch.Tensor) -> None:
        check_weight_matrix(weight, 1, 1, 1)
        check_block_weight(weight, self.block)

    def prune(self, weight: torch.Tensor, input_norm: torch.Tensor | None = None) -> BlockShuffledWeight:
        scores = None if input_norm is None else wanda_scores(weight, input_norm)
        return prune_block_shuffled(weight, self.sparsity, self.block, search=self.search, scores=scores)

    def reconstruct(self, weight: torch.Tensor, gram: torch.Tensor) -> BlockShuffledWeight:
        return sparsegpt_block_shuffled(
            weight, gram, self.sparsity, self.block, search=self.search, **_sparsegpt_settings(self)
        )

    def module(self, weight: SparseWeightBase, linear: nn.Linear) -> nn.Module:
        return BlockShuffledLinear.of(weight, linear)

    def describe(self) -> dict[str, Any]:
        return {"pattern": "block", "vector": 1, "method": self.method, "sparsity": self.sparsity}


CONFIGS = (NMConfig, CSRConfig, BitmapConfig, BlockConfig)


def sparsify(
    model: nn.Module,
    pattern: str | SparsifyConfig,
    vector: int = 1,
    skip: Callable[[str, nn.Module], bool] | None = None,
    method: str = "magnitude",
    calibration: Iterable[Any] | None = None,
    *,
    sparsity: float | None = None,
    block: tuple[int, int] = (32, 32),
    weight_dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> SparsifyReport:
    """Replace, in place, every ``nn.Linear`` of ``model`` that fits by a sparse module, and report.

    ``pattern`` is a config (:class:`NMConfig`, :class:`CSRConfig`, :class:`BitmapConfig`, :class:`BlockConfig`), or
    its short form: an ``"n:m"`` pattern (:class:`SparseLinear`, vector-wise with V=``vector``, pruned with
    ``method``: "magnitude", or "wanda" with ``calibration`` batches), ``"csr"`` (:class:`CSRLinear`, unstructured
    magnitude pruning to ``sparsity``), ``"bitmap"`` (:class:`BitmapLinear`: the same entries as a bitmap) or
    ``"block"`` (:class:`BlockShuffledLinear`: whole ``block`` tiles after a searched row permutation, to
    ``sparsity``). ``weight_dtype`` (``torch.float8_e4m3fn`` or ``torch.int8``, n:m patterns only)
    quantizes the kept values of each pruned layer (:class:`QuantizedSparseLinear`, weight-only, for inference).

    A layer is skipped, with its reason in the report, when ``skip(name, module)`` is true, its shape or dtype
    does not fit, its weight is shared (tied) with another module, it is a subclass of ``nn.Linear`` (whose
    owner may read ``.weight`` as a tensor) or it is ``model`` itself. ``progress`` draws a bar on stderr (by
    default when stderr is a terminal).

    A model on the meta device (built under ``torch.device("meta")``, as transformers and accelerate build large
    models) becomes a shape-only skeleton: no mask can be chosen from weights without values, so each layer gets
    its format's placeholder structure (:meth:`SparseWeightBase.placeholder_indices`: N:M keeps the first n of
    every m; CSR and bitmap the first ``round((1 - sparsity) * N * K)`` entries in row-major order; block as many
    blocks as ``sparsity`` keeps, the first in row-major block order, under the identity row permutation), whose
    tensors have the shapes of the really pruned model's. Load the real sparse weights into it
    (``load_state_dict(state, assign=True)``, or ``to_empty(device=...)`` then ``load_state_dict``); ``to_empty``
    alone gives the placeholder structure with uninitialised values.
    """
    if isinstance(pattern, SparsifyConfig):
        given = {"vector": vector != 1, "method": method != "magnitude", "sparsity": sparsity is not None,
                 "block": block not in ((32, 32), [32, 32]), "weight_dtype": weight_dtype is not None}
        if any(given.values()):
            names = ", ".join(name for name, set_ in given.items() if set_)
            raise TypeError(f"{names}: part of the config when one is given; got {type(pattern).__name__} and {names}")
        config = pattern
    else:
        config = config_of(pattern, vector, method, sparsity, block, weight_dtype)
    return swap_linears(model, config, skip, calibration, progress=progress)


def config_of(
    pattern: str, vector: int = 1, method: str = "magnitude", sparsity: float | None = None,
    block: tuple[int, int] = (32, 32), weight_dtype: torch.dtype | None = None,
) -> SparsifyConfig:
    """The config that :func:`sparsify`'s short form names, with the checks across its arguments."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern: expected an 'n:m', {_FORMAT_NAMES} string or a config, got {type(pattern).__name__}")
    _check_method(method)
    if pattern.lower() in FORMATS and pattern not in FORMATS:
        raise ValueError(f"pattern: expected {pattern.lower()!r} (lower case), got {pattern!r}")
    if pattern not in FORMATS:
        try:
            parse_pattern(pattern)
        except ValueError as error:
            raise ValueError(f"{error}; or {_FORMAT_NAMES} for the other formats") from None
        check_vector(vector)
        if sparsity is not None:
            raise ValueError(f"sparsity: an n:m pattern fixes the sparsity ({pattern}); got sparsity={sparsity}")
        return NMConfig(pattern, vector, method, weight_dtype=weight_dtype)
    if weight_dtype is not None:
        raise ValueError(f"weight_dtype: quantized values are for n:m patterns; pattern {pattern!r} takes None, "
                         f"got {weight_dtype}")
    if sparsity is None:
        raise ValueError(f"sparsity: pattern {pattern!r} needs the fraction of weights to prune, got None")
    if vector != 1:
        raise ValueError(f"vector: applies to n:m patterns only; pattern {pattern!r} needs vector=1, got {vector}")
    if pattern == "block":
        return BlockConfig(sparsity, block, method=method)
    return CSRConfig(sparsity, method) if pattern == "csr" else BitmapConfig(sparsity, method)


def swap_linears(
    model: nn.Module,
    config: SparsifyConfig,
    skip: Callable[[str, nn.Module], bool] | None = None,
    calibration: Iterable[Any] | None = None,
    *,
    progress: bool | None = None,
) -> SparsifyReport:
    """The one swap loop (:func:`sparsify`, SR-STE's preparation): every eligible ``nn.Linear`` of ``model``
    (:func:`eligible_linears`) is replaced by ``config.make``. Layers that cannot be pruned are refused before the
    first swap, so that the model is left as it was; every error names its module. ``progress``: a bar on stderr
    (None: when stderr is a terminal)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if skip is not None and not callable(skip):
        raise TypeError(f"skip: expected a callable (name, module) -> bool or None, got {type(skip).__name__}")
    described = config.describe()
    method = config.method
    if method != "magnitude" and calibration is None:
        raise ValueError(f"calibration: method {method!r} needs an iterable of input batches, got None")
    if calibration is not None and not isinstance(calibration, Iterable):
        raise TypeError(f"calibration: expected an iterable of input batches, got {type(calibration).__name__}")
    report = SparsifyReport(described["pattern"], described["vector"], described["method"], described["sparsity"])
    targets = eligible_linears(model, config.fits, skip, report)
    for name, module in targets.items():
        try:
            check_finite(module.weight.detach())
        except ValueError as error:
            raise ValueError(f"{name}: {error}; no layer was swapped") from None
    show = sys.stderr.isatty() if progress is None else bool(progress)
    label = f"sparsify {described['pattern']}"
    norms: dict[str, torch.Tensor] = {}
    reconstructed: dict[str, SparseWeightBase] = {}
    if method == "wanda":
        norms = collect_input_norms(model, calibration, list(targets))
    elif method == "sparsegpt":
        reconstructed = _reconstruct_in_order(model, config, calibration, targets, label if show else None)
    total = len(targets)
    for name in list(targets):
        if show:
            draw_progress(len(report.swapped), total, f"{label}: {name}")
        module = targets.pop(name)  # held nowhere else here: each dense weight is freed once swapped
        try:
            if name in reconstructed:
                sparse = config.module(reconstructed.pop(name), module)
            else:
                sparse = config.make(module, norms.pop(name, None))
        except (TypeError, ValueError) as error:
            done = f"; swapped before it: {', '.join(report.swapped)}" if report.swapped else "; no layer was swapped"
            raise type(error)(f"{name}: {error}{done}") from error
        replace_module(model, name, sparse)
        report.swapped.append(name)
        report.dense_bytes += module.weight.numel() * module.weight.element_size()
        report.sparse_bytes += config.sparse_bytes(sparse)
    if show and total:
        draw_progress(total, total, f"{label}: done")
    return report


def _reconstruct_in_order(
    model: nn.Module,
    config: SparsifyConfig,
    calibration: Iterable[Any],
    targets: dict[str, nn.Linear],
    label: str | None,
) -> dict[str, SparseWeightBase]:
    """SparseGPT through ``model`` (:func:`nmspmm.prune.prune_sequentially`): each target's pruned weight, by
    name. Their dense weights then hold the pruned ones; on an error they are restored and the error names the
    layer."""

    def prune_layer(name: str, weight: torch.Tensor, gram: torch.Tensor) -> SparseWeightBase:
        try:
            return config.reconstruct(weight, gram)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{name}: {error}; no layer was swapped") from error

    def show(done: int, total: int, name: str) -> None:
        draw_progress(done, total, f"{label}: SparseGPT {name}")

    return prune_sequentially(model, calibration, prune_layer, list(targets), progress=None if label is None else show)


def eligible_linears(
    model: nn.Module,
    fits: Callable[[torch.Tensor], None],
    skip: Callable[[str, nn.Module], bool] | None,
    report: SparsifyReport,
) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` whose weight ``fits`` (raises no TypeError or ValueError), by name;
    the others go into ``report.skipped`` with the reason (user filter, subclass, the model itself, tied weight,
    the error ``fits`` raised)."""
    owners: defaultdict[int, list[str]] = defaultdict(list)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners[id(parameter)].append(name)
    targets: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if skip is not None and skip(name, module):
            report.skipped[name] = "user filter"
        elif type(module) is not nn.Linear:
            report.skipped[name] = f"a subclass of nn.Linear ({type(module).__name__}); its owner may read .weight"
        elif not name:
            report.skipped[name] = "the model itself is an nn.Linear; use SparseLinear.from_dense"
        elif len(owners[id(module.weight)]) > 1:
            others = [owner for owner in owners[id(module.weight)] if owner != f"{name}.weight"]
            report.skipped[name] = f"weight shared (tied) with {', '.join(others)}"
        else:
            try:
                fits(module.weight)
            except (TypeError, ValueError) as error:
                report.skipped[name] = str(error)
            else:
                targets[name] = module
    return targets


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule ``name`` of ``model`` is."""
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, module)


def _compact_names(names: list[str]) -> str:
    """Module names with their first numeric part (the layer index) collapsed, in first-seen order:
    ``layers.{0-3}.mlp.up_proj`` stands for four layers' ``up_proj``; indices that are not one consecutive run are
    listed (``{0,2,5}``)."""
    groups: dict[str, list[int]] = {}
    for name in names:
        parts = name.split(".")
        numbers = [i for i, part in enumerate(parts) if part.isdigit()]
        if not numbers:
            groups.setdefault(name, [])
            continue
        key = ".".join("{}" if i == numbers[0] else part for i, part in enumerate(parts))
        groups.setdefault(key, []).append(int(parts[numbers[0]]))
    out = []
    for key, indices in groups.items():
        if not indices:
            out.append(key)
            continue
        ordered = sorted(set(indices))
        if len(ordered) == 1:
            span = str(ordered[0])
        elif ordered == list(range(ordered[0], ordered[-1] + 1)):
            span = f"{{{ordered[0]}-{ordered[-1]}}}"
        else:
            span = "{" + ",".join(map(str, ordered)) + "}"
        out.append(key.replace("{}", span))
    return ", ".join(out)


def _format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.4g} {unit}"
        count /= 1024
    return f"{count:.4g} GiB"
