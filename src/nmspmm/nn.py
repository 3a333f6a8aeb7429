"""Modules: :class:`SparseLinear`, a drop-in for ``nn.Linear`` whose weight is vector-wise N:M sparse, and
:func:`sparsify`, which swaps a model's ``nn.Linear`` layers for it in place."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import ops
from .formats import NMSparseWeight
from .formats.pattern import check_vector, check_weight_matrix, parse_pattern
from .prune import prune

METHODS = ("magnitude", "wanda")


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored in vector-wise N:M form, for ``x`` of shape ``[..., in_features]``.

    The kept weights are the Parameter ``values`` (so any optimizer fine-tunes them under a fixed mask), their
    positions the uint8 buffer ``offsets`` (saved in the state dict) and the derived ``kept_offsets`` (not saved).
    """

    values: nn.Parameter
    offsets: torch.Tensor
    kept_offsets: torch.Tensor
    bias: nn.Parameter | None

    def __init__(self, weight: NMSparseWeight, bias: torch.Tensor | None = None, *, backend: str = "auto") -> None:
        """Wrap ``weight`` (sharing its tensors) and an optional ``[out_features]`` ``bias``; ``backend`` is
        passed to :func:`nmspmm.linear` on every call."""
        super().__init__()
        if not isinstance(weight, NMSparseWeight):
            raise TypeError(f"weight: expected an nmspmm.NMSparseWeight, got {type(weight).__name__}")
        ops.check_bias(bias, weight)
        ops.check_backend(backend)
        self.out_features, self.in_features = weight.shape
        self.pattern = weight.pattern
        self.vector = weight.vector
        self.backend = backend
        self.values = nn.Parameter(weight.values.detach())
        self.register_buffer("offsets", weight.offsets)
        self.register_buffer("kept_offsets", weight.kept_offsets(), persistent=False)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach())

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
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        dense = linear.weight.detach()
        if mask is None:
            weight = prune(dense, pattern, vector)
        else:
            weight = NMSparseWeight.from_dense(dense, mask, pattern, vector)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        module = cls(weight, bias, backend=backend)
        module.values.requires_grad_(linear.weight.requires_grad)
        if module.bias is not None:
            module.bias.requires_grad_(linear.bias.requires_grad)
        return module

    @property
    def weight(self) -> NMSparseWeight:
        """The sparse weight as an :class:`NMSparseWeight` over this module's tensors (validated when they
        were built or loaded, not again)."""
        shape = (self.out_features, self.in_features)
        return NMSparseWeight._trusted(self.values, self.offsets, self.pattern, self.vector, shape, self.kept_offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, backend=self.backend)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight, zeros where pruned."""
        return self.weight.to_dense()

    def extra_repr(self) -> str:
        backend = f", backend='{self.backend}'" if self.backend != "auto" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern='{self.pattern}', "
            f"vector={self.vector}, bias={self.bias is not None}{backend}"
        )

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
        """Check the incoming ``values`` and ``offsets`` (either may come from the module) as one weight of this
        module's pattern, vector and shape, raising ValueError if they are not; load; derive ``kept_offsets``."""
        values = state_dict.get(prefix + "values", self.values.detach())
        offsets = state_dict.get(prefix + "offsets", self.offsets)
        if isinstance(values, torch.Tensor) and isinstance(offsets, torch.Tensor):
            offsets = offsets.to(values.device)
        shape = (self.out_features, self.in_features)
        try:
            NMSparseWeight(values, offsets, self.pattern, self.vector, shape)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"state_dict: {prefix}values and {prefix}offsets are not a {self.pattern} weight with "
                f"vector={self.vector} and shape {shape}: {error}"
            ) from error
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        loaded = NMSparseWeight._trusted(self.values, self.offsets, self.pattern, self.vector, shape)
        self.kept_offsets = loaded.kept_offsets()


@dataclass
class SparsifyReport:
    """What :func:`sparsify` did: the layers swapped, those skipped (name -> reason), and the weight bytes of the
    swapped layers before (dense) and after (values + offsets + metadata)."""

    pattern: str
    vector: int
    method: str
    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    dense_bytes: int = 0
    sparse_bytes: int = 0

    def __str__(self) -> str:
        lines = [
            f"sparsify {self.pattern} (vector={self.vector}, {self.method}): "
            f"{len(self.swapped)} linear layers swapped, {len(self.skipped)} skipped"
        ]
        if self.swapped:
            lines.append(
                f"  weights of the swapped layers: {_format_bytes(self.dense_bytes)} dense -> "
                f"{_format_bytes(self.sparse_bytes)} sparse ({self.sparse_bytes / self.dense_bytes:.1%})"
            )
        lines += [f"  skipped {name or '<model>'}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def sparsify(
    model: nn.Module,
    pattern: str,
    vector: int = 1,
    skip: Callable[[str, nn.Module], bool] | None = None,
    method: str = "magnitude",
    calibration: Iterable[Any] | None = None,
) -> SparsifyReport:
    """Replace, in place, every ``nn.Linear`` of ``model`` that fits ``pattern`` and ``vector`` by a
    :class:`SparseLinear` pruned with ``method`` ("magnitude", or "wanda" with ``calibration`` batches).

    A layer is skipped, with its reason in the report, when ``skip(name, module)`` is true, its shape or dtype
    does not fit, its weight is shared (tied) with another module, it is a subclass of ``nn.Linear`` (whose
    owner may read ``.weight`` as a tensor) or it is ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    n, m = parse_pattern(pattern)
    check_vector(vector)
    if skip is not None and not callable(skip):
        raise TypeError(f"skip: expected a callable (name, module) -> bool or None, got {type(skip).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method == "wanda" and calibration is None:
        raise ValueError("calibration: method 'wanda' needs an iterable of input batches, got None")
    report = SparsifyReport(pattern, vector, method)
    targets = eligible_linears(model, n, m, vector, skip, report)
    norms = None
    if method == "wanda":
        from .prune import collect_input_norms, wanda_mask

        norms = collect_input_norms(model, calibration, list(targets))
    for name in list(targets):
        module = targets.pop(name)  # held nowhere else here: each dense weight is freed once swapped
        mask = None if norms is None else wanda_mask(module.weight.detach(), norms.pop(name), pattern, vector)
        sparse = SparseLinear.from_dense(module, pattern, vector, mask)
        replace_module(model, name, sparse)
        report.swapped.append(name)
        report.dense_bytes += module.weight.numel() * module.weight.element_size()
        report.sparse_bytes += sparse.weight.nbytes
    return report


def eligible_linears(
    model: nn.Module,
    n: int,
    m: int,
    vector: int,
    skip: Callable[[str, nn.Module], bool] | None,
    report: SparsifyReport,
) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` that can take an n:m weight with V=``vector``, by name; the others
    go into ``report.skipped`` with the reason (user filter, subclass, the model itself, tied weight, shape)."""
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
                check_weight_matrix(module.weight, n, m, vector)
            except (TypeError, ValueError) as error:
                report.skipped[name] = str(error)
            else:
                targets[name] = module
    return targets


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule ``name`` of ``model`` is."""
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, module)


def _format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.4g} {unit}"
        count /= 1024
    return f"{count:.4g} GiB"
