"""Shuffled block-sparse products: argument checks, the torch.library custom op with its autograd formula
(dense torch products for the backward), and dispatch to the Triton kernel or the dense reference."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..formats.block_shuffled import BlockShuffledWeight, block_rows_of, dense_from_blocks, inverse_permutation
from ..kernels.block_sparse import BlockSparseProduct
from .backend import (
    ProductPlan, as_rows, call_op, check_backend, check_operands, define_op, input_precision, kept_plan, needs_grad,
    planned_with_gradient, reference_linear, use_triton,
)

_OP_SCHEMA = (
    "(Tensor x, Tensor values, Tensor block_columns, Tensor block_row_offsets, Tensor block_row_order, "
    "Tensor row_permutation, Tensor? bias, str backend) -> Tensor"
)


def block_shuffled_linear(
    x: torch.Tensor, weight: BlockShuffledWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` of shape ``[..., K]``: a contiguous ``[..., N]`` result in x's dtype,
    outputs in the weight's original row order (the permutation stays inside the kernel).

    On CUDA this runs the Triton kernel (never a silent dense fallback); on the CPU the dense reference.
    ``backend="triton"`` forces the kernel, which on the CPU needs ``TRITON_INTERPRET=1``. Differentiable in
    x, the kept values and bias.
    """
    plan = _kept_plan(x, weight, bias, backend)
    if plan is not None:
        if not needs_grad(x, weight.values, bias):
            return plan(x)
        return planned_with_gradient(_BLOCK_SHUFFLED_LINEAR, plan, _op_args(x, weight, bias, backend), lambda: None)
    check_operands(x, weight, BlockShuffledWeight, bias)
    check_backend(backend)
    y = call_op(_BLOCK_SHUFFLED_LINEAR, _op_args(as_rows(x), weight, bias, backend))
    return y.view(*x.shape[:-1], weight.shape[0])


def _op_args(x: torch.Tensor, weight: BlockShuffledWeight, bias: torch.Tensor | None, backend: str) -> tuple:
    """The product's arguments, in the op's order."""
    return (
        x, weight.values, weight.block_columns, weight.block_row_offsets, weight.block_row_order,
        weight.row_permutation, bias, backend,
    )


def _product(
    x: torch.Tensor,
    values: torch.Tensor,
    block_columns: torch.Tensor,
    block_row_offsets: torch.Tensor,
    block_row_order: torch.Tensor,
    row_permutation: torch.Tensor,
    bias: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """``[M, N]`` = ``x`` ``[M, K]`` times the weight given by its fields (see :class:`BlockShuffledWeight`),
    plus ``bias``; operands are trusted (:func:`block_shuffled_linear` checks them)."""
    rows = row_permutation.shape[0]
    if not use_triton(backend, x.device):
        order = inverse_permutation(row_permutation)
        dense = dense_from_blocks(values, block_columns, block_row_offsets, (rows, x.shape[1]))[order]

        def kept() -> torch.Tensor:
            ones = torch.ones_like(values)
            return dense_from_blocks(ones, block_columns, block_row_offsets, (rows, x.shape[1]))[order] != 0

        return reference_linear(x, dense, kept, bias)
    plan = _plan(
        tuple(x.shape), x.stride(), values, block_columns, block_row_offsets, block_row_order, row_permutation, bias
    )
    return plan(x)


def _plan(
    x_shape: tuple[int, ...],
    x_strides: tuple[int, ...],
    values: torch.Tensor,
    block_columns: torch.Tensor,
    block_row_offsets: torch.Tensor,
    block_row_order: torch.Tensor,
    row_permutation: torch.Tensor,
    bias: torch.Tensor | None,
) -> ProductPlan:
    """The block-sparse product's plan (:class:`backend.ProductPlan`): the kernel reads x row-major, never
    transposed."""
    values, block_columns, block_row_offsets, block_row_order, row_permutation = (
        t.contiguous() for t in (values, block_columns, block_row_offsets, block_row_order, row_permutation)
    )
    bias = None if bias is None else bias.contiguous()
    rows = row_permutation.shape[0]

    def make(
        xt_shape: tuple[int, int], xt_strides: tuple[int, int], out_strides: tuple[int, int]
    ) -> Callable[..., None]:
        return BlockSparseProduct(
            (xt_shape[1], xt_shape[0]), (xt_strides[1], xt_strides[0]), out_strides, values, block_columns,
            block_row_offsets, block_row_order, row_permutation, bias, input_precision(values.dtype),
        )

    return ProductPlan(x_shape, x_strides, False, rows, lambda tokens, xt_strides: False, make)


def _kept_plan(
    x: torch.Tensor, weight: BlockShuffledWeight, bias: torch.Tensor | None, backend: str
) -> ProductPlan | None:
    """The weight's kept plan for this layout of ``x`` (:func:`backend.kept_plan`), or None where the call takes
    the full path."""

    def make() -> ProductPlan:
        return _plan(
            tuple(x.shape), x.stride(), weight.values, weight.block_columns, weight.block_row_offsets,
            weight.block_row_order, weight.row_permutation, bias,
        )

    return kept_plan(x, weight, BlockShuffledWeight, bias, backend, False, make)


def _fake(
    x: torch.Tensor, values: torch.Tensor, block_columns: torch.Tensor, block_row_offsets: torch.Tensor,
    block_row_order: torch.Tensor, row_permutation: torch.Tensor, *_: object,
) -> torch.Tensor:
    return x.new_empty((x.shape[0], row_permutation.shape[0]))


def _setup_backward(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, values, block_columns, block_row_offsets, _, row_permutation, bias, _ = inputs
    ctx.save_for_backward(x, values, block_columns, block_row_offsets, row_permutation)
    ctx.has_bias = bias is not None


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor) -> tuple:
    """Dense gradients in at least fp32: ``dY @ W`` for x, and for the kept values the tiles of
    ``dY[:, perm].T @ x`` at the kept blocks (permuted order), for bias the column sums of ``dY``."""
    # x is [M, K] in the op, in any leading shape in an eager call with a kept plan (planned_with_gradient).
    x_given, values, block_columns, block_row_offsets, row_permutation = ctx.saved_tensors
    x, grad_y = as_rows(x_given), as_rows(grad_y)
    need_x, need_values, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[6]
    compute = torch.promote_types(grad_y.dtype, torch.float32)
    rows, cols = row_permutation.shape[0], x.shape[1]
    blocks, bn, bk = values.shape
    grad_permuted = grad_y[:, row_permutation.long()].to(compute)
    grad_x = grad_values = grad_bias = None
    if need_x:
        permuted = dense_from_blocks(values, block_columns, block_row_offsets, (rows, cols)).to(compute)
        grad_x = (grad_permuted @ permuted).to(x.dtype).view(x_given.shape)
    if need_values:
        tiles = (grad_permuted.t() @ x.to(compute)).view(rows // bn, bn, cols // bk, bk).transpose(1, 2)
        grad_values = tiles[block_rows_of(block_row_offsets, blocks), block_columns.long()].to(values.dtype)
    if ctx.has_bias and need_bias:
        grad_bias = grad_y.sum(0)
    return grad_x, grad_values, None, None, None, None, grad_bias, None


_BLOCK_SHUFFLED_LINEAR = define_op(
    "nmspmm::block_shuffled_linear", _OP_SCHEMA, _product, _fake, _setup_backward, _backward
)
# The custom op itself (torch.ops.nmspmm.block_shuffled_linear): what torch.compile traces and opcheck checks.
block_shuffled_linear_op = _BLOCK_SHUFFLED_LINEAR.op
