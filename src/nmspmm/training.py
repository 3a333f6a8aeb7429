"""Sparse training with SR-STE (Zhou et al., ICLR 2021): dense master weights, an N:M mask recomputed by
magnitude every few steps, the sparse kernels in the forward pass, and a straight-through gradient for every
weight plus a decay that pushes the pruned ones toward zero so that the mask settles.

``prepare_srste`` swaps a model's ``nn.Linear`` layers for :class:`SRSTELinear`; after training,
``finalize_srste`` swaps those for :class:`~nmspmm.nn.SparseLinear` with the final mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .formats.nm import NMSparseWeight, kept_row_columns
from .formats.pattern import check_vector, check_weight_matrix, parse_pattern
from .nn import SparseLinear, SparsifyConfig, SparsifyReport, replace_module, swap_linears
from .ops.backend import check_backend, check_operands
from .ops.nm import grad_input, nm_linear_op
from .prune import prune

DEFAULT_DECAY = 2e-4


class _SRSTEProduct(torch.autograd.Function):
    """``x @ (W * mask).T + b`` through the N:M kernels, with SR-STE's gradient for the dense ``W``:
    ``dY.T @ x`` at every position (straight through the mask) plus ``decay * W`` where the mask drops."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x_rows: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        kept_offsets: torch.Tensor,
        n: int,
        m: int,
        vector: int,
        decay: float,
        backend: str,
    ) -> torch.Tensor:
        columns = kept_row_columns(kept_offsets, n, m, vector)
        values = weight.gather(1, columns)
        ctx.save_for_backward(x_rows, weight, values, kept_offsets, columns)
        ctx.pattern = (n, m, vector, decay, backend)
        return nm_linear_op(x_rows, values, kept_offsets, bias, n, m, vector, backend)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor) -> tuple:
        x_rows, weight, values, kept_offsets, columns = ctx.saved_tensors
        n, m, vector, decay, backend = ctx.pattern
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_input(grad_y, values, kept_offsets, n, m, vector, x_rows.shape[1], backend)
        if ctx.needs_input_grad[1]:
            compute = torch.promote_types(grad_y.dtype, torch.float32)
            dropped = torch.ones_like(weight, dtype=torch.bool).scatter_(1, columns, False)
            full = grad_y.to(compute).t() @ x_rows.to(compute)
            grad_weight = (full + decay * dropped * weight.to(compute)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


class SRSTELinear(nn.Module):
    """A linear layer trained sparse with SR-STE: the dense ``weight`` is the Parameter the optimizer updates,
    the forward pass multiplies by its magnitude-pruned N:M form (recomputed before every ``mask_interval``-th
    training step, held fixed in eval mode and no-grad calls), and ``to_sparse`` gives the :class:`SparseLinear`
    to deploy. The state dict holds the dense weights only; loading one recomputes the mask from them."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    kept_offsets: torch.Tensor

    def __init__(
        self,
        linear: nn.Linear,
        pattern: str,
        vector: int = 1,
        *,
        mask_interval: int = 1,
        decay: float = DEFAULT_DECAY,
        backend: str = "auto",
    ) -> None:
        """Take over ``linear``'s weight and bias (shared, not copied) as the dense master weights."""
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        self.n, self.m = parse_pattern(pattern)
        self.vector = check_vector(vector)
        check_weight_matrix(linear.weight, self.n, self.m, self.vector, "linear.weight")
        if isinstance(mask_interval, bool) or not isinstance(mask_interval, int) or mask_interval < 1:
            raise ValueError(f"mask_interval: expected a positive int (training steps), got {mask_interval!r}")
        if not isinstance(decay, (int, float)) or not math.isfinite(decay) or decay < 0:
            raise ValueError(f"decay: expected a finite, non-negative number, got {decay!r}")
        check_backend(backend)
        self.out_features, self.in_features = linear.weight.shape
        self.mask_interval, self.decay, self.backend = mask_interval, float(decay), backend
        self.weight = linear.weight
        self.bias = linear.bias
        self.steps = 0
        self.register_buffer("kept_offsets", torch.empty(0, dtype=torch.uint8), persistent=False)
        self.update_mask()

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    def update_mask(self) -> None:
        """Recompute the N:M mask from the current dense weight by magnitude (raises on non-finite weights)."""
        self.kept_offsets = prune(self.weight.detach(), self.pattern, self.vector).kept_offsets()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            if self.steps % self.mask_interval == 0:
                self.update_mask()
            self.steps += 1
        check_operands(x, self.weight, torch.Tensor, self.bias)
        rows = x.reshape(-1, self.in_features)
        y = _SRSTEProduct.apply(
            rows, self.weight, self.bias, self.kept_offsets, self.n, self.m, self.vector, self.decay, self.backend
        )
        return y.view(*x.shape[:-1], self.out_features)

    def to_sparse(self) -> SparseLinear:
        """The deployable :class:`SparseLinear` with the current mask and copies of the kept values and bias."""
        mask = torch.zeros_like(self.weight, dtype=torch.bool)
        mask.scatter_(1, kept_row_columns(self.kept_offsets, self.n, self.m, self.vector), True)
        sparse = NMSparseWeight.from_dense(self.weight.detach(), mask, self.pattern, self.vector)
        bias = None if self.bias is None else self.bias.detach().clone()
        return SparseLinear(sparse, bias, backend=self.backend)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """Load the dense weights, then take the mask from them (masks are derived, so files hold none)."""
        super()._load_from_state_dict(*args, **kwargs)
        self.update_mask()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern='{self.pattern}', "
            f"vector={self.vector}, mask_interval={self.mask_interval}, decay={self.decay}, "
            f"bias={self.bias is not None}"
        )


@dataclass(frozen=True)
class SRSTEConfig(SparsifyConfig):
    """:func:`prepare_srste`'s swap: an :class:`SRSTELinear` of ``pattern`` with V=``vector`` sharing the layer's
    parameters, its mask recomputed every ``mask_interval`` steps, ``decay`` on the pruned weights."""

    pattern: str
    vector: int = 1
    mask_interval: int = 1
    decay: float = DEFAULT_DECAY
    backend: str = "auto"

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        check_vector(self.vector)

    def fits(self, weight: torch.Tensor) -> None:
        n, m = parse_pattern(self.pattern)
        check_weight_matrix(weight, n, m, self.vector)

    def make(self, linear: nn.Linear, input_norm: torch.Tensor | None = None) -> nn.Module:
        return SRSTELinear(
            linear, self.pattern, self.vector, mask_interval=self.mask_interval, decay=self.decay, backend=self.backend
        )

    def sparse_bytes(self, module: nn.Module) -> int:
        return module.to_sparse().weight.nbytes

    def describe(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "vector": self.vector, "method": "sr-ste", "sparsity": None}


def prepare_srste(
    model: nn.Module,
    pattern: str,
    vector: int = 1,
    skip: Callable[[str, nn.Module], bool] | None = None,
    *,
    mask_interval: int = 1,
    decay: float = DEFAULT_DECAY,
    backend: str = "auto",
) -> SparsifyReport:
    """Replace, in place, every eligible ``nn.Linear`` of ``model`` (as :func:`~nmspmm.sparsify` chooses them)
    by an :class:`SRSTELinear` sharing its parameters; train as usual, then call :func:`finalize_srste`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return swap_linears(model, SRSTEConfig(pattern, vector, mask_interval, decay, backend), skip)


def finalize_srste(model: nn.Module) -> list[str]:
    """Replace, in place, every :class:`SRSTELinear` of ``model`` by its :meth:`~SRSTELinear.to_sparse`
    module; return their names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    names = [name for name, module in model.named_modules() if isinstance(module, SRSTELinear)]
    if "" in names:
        raise ValueError("model: is itself an SRSTELinear; call model.to_sparse() instead")
    for name in names:
        replace_module(model, name, model.get_submodule(name).to_sparse())
    return names
