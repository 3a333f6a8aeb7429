"""What every sparse weight format shares: dtype and device from its values, moves, and the deprecated
``Format.prune`` entry points, which reach the pruning package through a registry it fills (the formats sit
below pruning and import nothing of it)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

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
    """Base of the weight formats; a subclass holds ``values`` and implements ``to`` (a validated copy)."""

    values: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def cuda(self, device: int | str | torch.device | None = None) -> Any:
        """A copy on a CUDA device (the current one by default)."""
        return self.to("cuda" if device is None else device)

    def cpu(self) -> Any:
        """A copy on the CPU."""
        return self.to("cpu")
