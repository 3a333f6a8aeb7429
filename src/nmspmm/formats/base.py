"""What every sparse weight format shares: dtype and device from its values, moves, and the deprecated
``Format.prune`` entry points, which reach the pruning package through a registry it fills (the formats sit
below pruning and import nothing of it)."""

from __future__ import annotations

import json
import warnings
import zlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .pattern import check_values, dtype_name, holds_values

if TYPE_CHECKING:
    from typing_extensions import Self

def checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes in row-major order (about 7 GB/s on one CPU core, so 0.15 s per GB): written
    with every saved weight and checked on load, since neither torch.load nor safetensors checks the data."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return zlib.crc32(memoryview(data.numpy()))


def fields_checksum(fields: Mapping[str, Any]) -> int:
    """CRC-32 of a weight's JSON-able fields (format, pattern, shape, dtype, ...) in one canonical JSON form: saved
    beside its tensors' checksums, since unchanged bytes read under another field (a larger K, the other
    half-precision dtype) would load other weights."""
    return zlib.crc32(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())


def verify_fields(fields: Mapping[str, Any], saved: int | None, where: str) -> None:
    """Refuse ``fields`` (as rebuilt from a file) whose :func:`fields_checksum` differs from the one saved with
    them (None: a file written before field checksums)."""
    if saved is not None and fields_checksum(fields) != saved:
        raise ValueError(
            f"fields: {dict(fields)} do not match the checksum saved with them: {where} is corrupted"
        )


def verify_checksums(tensors: dict[str, torch.Tensor], checksums: dict[str, int] | None, where: str) -> None:
    """Refuse any of ``tensors`` whose bytes differ from the checksum saved with it (``where`` names the file)."""
    if checksums is None:
        return
    for name, tensor in tensors.items():
        if name in checksums and checksum(tensor) != checksums[name]:
            raise ValueError(f"{name}: its bytes do not match the checksum saved with them: {where} is corrupted")


# Format class -> (name of the pruning function, the function), filled when nmspmm.prune is imported.
_PRUNERS: dict[type, tuple[str, Callable[..., Any]]] = {}


def register_pruner(format_type: type, name: str, function: Callable[..., Any]) -> None:
    """Make ``function`` (public as ``nmspmm.prune.<name>``) what the deprecated ``format_type.prune`` calls."""
    _PRUNERS[format_type] = (name, function)


def deprecated_prune(format_type: type, *args: Any, **kwargs: Any) -> Any:
    """Run the pruning function registered for ``format_type``, warning that ``Format.prune`` is deprecated."""
    if format_type not in _PRUNERS:
        raise RuntimeError(f"{format_type.__name__}.prune: import nmspmm.prune first (it registers the pruners)")
    name, function = _PRUNERS[format_type]
    warnings.warn(
        f"{format_type.__name__}.prune is deprecated; call nmspmm.prune.{name}(...) with the same arguments",
        DeprecationWarning, stacklevel=3,
    )
    return function(*args, **kwargs)


class SparseWeightBase:
    """The contract of a weight format. A format holds its kept ``values`` and the index tensors named by
    ``STATE_TENSORS`` (what a file stores), and the JSON-able fields ``STATE_FIELDS`` (:meth:`state_fields`);
    :meth:`from_state` rebuilds it from both, validating everything; it has a ``shape`` ``[N, K]``, ``nbytes``,
    ``to_dense()`` and ``mask()``. Written once here: dtype and device, :meth:`state_tensors`, and the moves
    (:meth:`to`, :meth:`cuda`, :meth:`cpu`), which rebuild through :meth:`from_state`."""

    STATE_TENSORS: ClassVar[tuple[str, ...]]
    STATE_FIELDS: ClassVar[tuple[str, ...]]
    values: torch.Tensor
    shape: torch.Size

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def launch_plans(self) -> dict[tuple, Any]:
        """What the products prepare for repeated calls on this weight, by layout of the activations
        (``nmspmm.ops`` fills it; never saved or copied)."""
        plans = self.__dict__.get("_launch_plans")
        if plans is None:
            plans = self.__dict__["_launch_plans"] = {}
        return plans

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes held: values, index tensors and metadata."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name (what a file holds; derived structures are rebuilt on use)."""
        return {name: getattr(self, name) for name in self.STATE_TENSORS}

    def state_checksums(self) -> dict[str, int]:
        """:func:`checksum` of every stored tensor that holds values (:func:`holds_values`; a shape-only one has no
        bytes to sum), by field name, and under ``"fields"`` the :func:`fields_checksum` of :meth:`state_fields`:
        what a pickle carries beside them (:meth:`verify_state_checksums`)."""
        sums = {name: checksum(tensor) for name, tensor in self.state_tensors().items() if holds_values(tensor)}
        sums["fields"] = fields_checksum(self.state_fields())
        return sums

    def verify_state_checksums(self, checksums: dict[str, int] | None, where: str) -> None:
        """Refuse this weight, just rebuilt from a pickle, where its tensors or fields differ from the
        :meth:`state_checksums` saved with it (pickles written before them have none, or no ``"fields"``)."""
        if checksums is None:
            return
        verify_checksums(self.state_tensors(), checksums, where)
        verify_fields(self.state_fields(), checksums.get("fields"), where)

    @property
    def shape_only(self) -> bool:
        """True when a stored tensor has a shape but no values (on the meta device or fake: :func:`holds_values`),
        as in a model skeleton built on the meta device: validation then checks shapes, dtypes and devices only."""
        return not all(holds_values(tensor) for tensor in self.state_tensors().values())

    def state_fields(self) -> dict[str, Any]:
        """The JSON-able fields that, with :meth:`state_tensors`, rebuild this weight (``dtype`` among them)."""
        raise NotImplementedError

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], fields: dict[str, Any], *, allow_nonfinite: bool = False
    ) -> Self:
        """Rebuild (and so validate, :meth:`check_storage` included) a weight from :meth:`state_tensors` and
        :meth:`state_fields`."""
        raise NotImplementedError

    @classmethod
    def placeholder_indices(cls, values: torch.Tensor, fields: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The index tensors (every stored tensor but ``values``, on its device) of the placeholder structure of a
        weight of ``fields`` (:meth:`state_fields` without ``dtype``) holding as many kept values as ``values``:
        the structure pruning gives a weight without values (on the meta device or fake), where no mask can be
        chosen, and that a module moved off the meta device by ``to_empty`` holds until real weights load. Each
        format says which structure it is; its shapes are those of any weight pruned with the same settings."""
        raise NotImplementedError

    @classmethod
    def placeholder(cls, values: torch.Tensor, fields: dict[str, Any]) -> Self:
        """A weight over ``values`` of the :meth:`placeholder_indices` structure, rebuilt (so validated) by
        :meth:`from_state`."""
        tensors = {"values": values, **cls.placeholder_indices(values, fields)}
        return cls.from_state(tensors, {**fields, "dtype": dtype_name(values.dtype)})

    def to_dense(self) -> torch.Tensor:
        """The dense ``[N, K]`` weight, zeros where pruned."""
        raise NotImplementedError

    def check_storage(self, allow_nonfinite: bool = False) -> None:
        """Refuse stored tensors whose elements overlap in memory (a stride-0 or aliased view: every row would read
        row 0) and, unless ``allow_nonfinite`` or they hold no values (:attr:`shape_only`), NaN or infinite values
        (no product over them means anything; pruning refuses them too). Run after :meth:`validate` when a weight is
        built or loaded."""
        for name in self.STATE_TENSORS:
            if torch._debug_has_internal_overlap(getattr(self, name)) == 1:
                raise ValueError(f"{name}: its elements overlap in memory (a stride-0 or aliased view); expected "
                                 "a tensor of its own")
        if self.shape_only or allow_nonfinite or not self.values.numel():
            return
        if not bool(torch.isfinite(self.values).all()):
            bad = int((~torch.isfinite(self.values)).sum())
            raise ValueError(
                f"values: expected finite values, found {bad} NaN or infinite (allow_nonfinite=True accepts them)"
            )

    def mask(self) -> torch.Tensor:
        """bool ``[N, K]``: True where the weight is kept."""
        raise NotImplementedError

    def to(self, *args: Any, **kwargs: Any) -> Self:
        """Move to a device and/or cast the values to a float dtype (index tensors keep theirs), like Tensor.to:
        a validated copy (:meth:`check_storage` included). To ``"meta"`` it keeps shapes only; off the meta
        device there are no values to copy (torch says so): load real ones instead."""
        values = self.values.to(*args, **kwargs)
        check_values(values)
        tensors = {
            name: values if name == "values" else getattr(self, name).to(device=values.device)
            for name in self.STATE_TENSORS
        }
        # A weight that already holds NaN or infinite values (built with allow_nonfinite) may move; a cast that
        # makes them (an overflow to fp16, say) is refused.
        held = not self.shape_only and self.values.numel() > 0 and not bool(torch.isfinite(self.values).all())
        fields = {**self.state_fields(), "dtype": dtype_name(values.dtype)}
        return type(self).from_state(tensors, fields, allow_nonfinite=held)

    def cuda(self, device: int | str | torch.device | None = None) -> Self:
        """A copy on a CUDA device (the current one by default)."""
        return self.to("cuda" if device is None else device)

    def cpu(self) -> Self:
        """A copy on the CPU."""
        return self.to("cpu")
