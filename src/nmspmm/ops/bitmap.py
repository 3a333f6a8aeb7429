"""Unstructured sparse products on bitmap weights (:class:`BitmapWeight`): the checked functions, their
torch.library custom ops with the autograd formulas, and dispatch to the element-wise tensor-core kernel, which
expands each tile of the compressed weight in registers (CUDA, or the CPU interpreter when asked), or the dense
reference. The weight gradient at the kept positions is CSR's SDDMM (the kept values lie in the same order)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..formats.bitmap import WORD_BITS, BitmapWeight, dense_from_bitmap, mask_of
from ..kernels.nm_element import BitmapProduct, bitmap_matmul, choose_element_config
from .backend import (
    ProductPlan, as_rows, call_op, check_backend, check_gradient_extent, check_operands, define_op, input_precision,
    kept_plan, needs_grad, planned_with_gradient, reference_linear, use_triton,
)
from .csr import csr_sddmm_op

# Besides the forward structure the products take, optionally, the structures their backward reads: the row and
# column of every kept value (the weight gradient) and the transposed bitmap structure with the permutation of the
# values into its order (the input gradient). Callers pass them, cached on the weight, only when autograd will need
# them; the backward derives any that are missing.
_LINEAR_SCHEMA = (
    "(Tensor x, Tensor values, Tensor bitmap, Tensor block_offsets, Tensor? bias, str backend, "
    "Tensor? row_indices, Tensor? col_indices, Tensor? transposed_bitmap, Tensor? transposed_offsets, "
    "Tensor? permutation) -> Tensor"
)
_BACKWARD_KERNELS = "the bitmap backward kernels"


def bitmap_linear(
    x: torch.Tensor, weight: BitmapWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` of shape ``[..., K]`` and an unstructured ``weight`` stored as a bitmap:
    a contiguous ``[..., N]`` result in x's dtype.

    On CUDA this runs the Triton kernel (never a silent dense fallback); on the CPU the dense reference.
    ``backend="triton"`` forces the kernel, which on the CPU needs ``TRITON_INTERPRET=1``. ``x`` is read as it
    is stored (no transpose), so a call is one launch at any token count.
    """
    plan = _kept_plan(x, weight, bias, backend, False)
    if plan is not None:
        if not needs_grad(x, weight.values, bias):
            return plan(x)
        return planned_with_gradient(
            _BITMAP_LINEAR, plan, _op_args(x, weight, bias, backend),
            lambda: check_gradient_extent(as_rows(x), weight.shape[0], _BACKWARD_KERNELS),
        )
    check_operands(x, weight, BitmapWeight, bias)
    check_backend(backend)
    rows_in = as_rows(x)
    if needs_grad(x, weight.values, bias) and use_triton(backend, x.device):
        check_gradient_extent(rows_in, weight.shape[0], _BACKWARD_KERNELS)
    y = call_op(_BITMAP_LINEAR, _op_args(rows_in, weight, bias, backend))
    return y.view(*x.shape[:-1], weight.shape[0])


def bitmap_linear_feature_major(
    x_t: torch.Tensor, weight: BitmapWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """The same product on feature-major activations: ``x_t`` is ``[K, M]`` (``X.T``), the result ``[N, M]``."""
    plan = _kept_plan(x_t, weight, bias, backend, True)
    if plan is not None and not needs_grad(x_t, weight.values, bias):
        return plan(x_t)
    check_operands(x_t, weight, BitmapWeight, bias, feature_axis=0)
    if x_t.dim() != 2:
        raise ValueError(f"x_t: expected a 2-D [K, M] feature-major tensor, got shape {tuple(x_t.shape)}")
    check_backend(backend)
    if needs_grad(x_t, weight.values, bias) and use_triton(backend, x_t.device):
        check_gradient_extent(x_t.t(), weight.shape[0], _BACKWARD_KERNELS)
    return call_op(_BITMAP_LINEAR_FEATURE_MAJOR, _op_args(x_t, weight, bias, backend), plan)


def _op_args(x: torch.Tensor, weight: BitmapWeight, bias: torch.Tensor | None, backend: str) -> tuple:
    """The products' arguments: the forward structure, and the backward's structures where autograd will need
    them (they cost memory, so inference never derives them)."""
    grad = torch.is_grad_enabled()
    coordinates = weight.coordinates() if grad and weight.values.requires_grad else (None, None)
    transposed = weight.transposed_structure() if grad and x.requires_grad else (None, None, None)
    return (x, weight.values, weight.bitmap, weight.block_offsets, bias, backend, *coordinates, *transposed)


def _row_major_product(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmap: torch.Tensor,
    block_offsets: torch.Tensor,
    bias: torch.Tensor | None,
    backend: str,
    *_backward_structures: torch.Tensor | None,
) -> torch.Tensor:
    """``[M, N]`` = ``x`` ``[M, K]`` times the weight's transpose, plus ``bias``; operands are trusted
    (:func:`bitmap_linear` checks them); the backward's structures are not read here."""
    if not use_triton(backend, x.device):
        return _reference(x, values, bitmap, bias)
    return _plan(tuple(x.shape), x.stride(), False, values, bitmap, block_offsets, bias)(x)


def _feature_major_product(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmap: torch.Tensor,
    block_offsets: torch.Tensor,
    bias: torch.Tensor | None,
    backend: str,
    *_backward_structures: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`_row_major_product` on feature-major activations: ``x`` is ``[K, M]``, the result ``[N, M]``
    (contiguous)."""
    if not use_triton(backend, x.device):
        return _reference(x.t(), values, bitmap, bias).t().contiguous()
    return _plan(tuple(x.shape), x.stride(), True, values, bitmap, block_offsets, bias)(x)


def _plan(
    x_shape: tuple[int, ...],
    x_strides: tuple[int, ...],
    feature_major: bool,
    values: torch.Tensor,
    bitmap: torch.Tensor,
    block_offsets: torch.Tensor,
    bias: torch.Tensor | None,
) -> ProductPlan:
    """The product's plan (:class:`backend.ProductPlan`): the kernel reads x in either layout, so never a
    transpose."""
    rows = bitmap.shape[0]

    def make(
        xt_shape: tuple[int, int], xt_strides: tuple[int, int], out_strides: tuple[int, int]
    ) -> Callable[..., None]:
        config = choose_element_config(xt_shape[1], rows, xt_shape[0], WORD_BITS, values.dtype, values.device)
        return BitmapProduct(
            xt_shape, xt_strides, out_strides, values, bitmap, block_offsets, config, bias,
            input_precision(values.dtype),
        )

    return ProductPlan(x_shape, x_strides, feature_major, rows, lambda tokens, xt_strides: False, make)


def _kept_plan(
    x: torch.Tensor, weight: BitmapWeight, bias: torch.Tensor | None, backend: str, feature_major: bool
) -> ProductPlan | None:
    """The weight's kept plan for this layout of ``x`` (:func:`backend.kept_plan`), or None where the call takes
    the full path."""

    def make() -> ProductPlan:
        return _plan(
            tuple(x.shape), x.stride(), feature_major, weight.values, weight.bitmap, weight.block_offsets, bias
        )

    return kept_plan(x, weight, BitmapWeight, bias, backend, feature_major, make)


def _row_major_fake(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor, *_: object) -> torch.Tensor:
    return x.new_empty((x.shape[0], bitmap.shape[0]))


def _feature_major_fake(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor, *_: object) -> torch.Tensor:
    return x.new_empty((bitmap.shape[0], x.shape[1]))


def _reference(
    rows_in: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Dense reference: the product over the densified weight (:func:`backend.reference_linear`)."""
    cols = rows_in.shape[1]
    dense = dense_from_bitmap(values, bitmap, (bitmap.shape[0], cols))
    return reference_linear(rows_in, dense, lambda: mask_of(bitmap, cols), bias)


def _grad_input_product(
    grad_y: torch.Tensor,
    values: torch.Tensor,
    permutation: torch.Tensor,
    transposed_bitmap: torch.Tensor,
    transposed_offsets: torch.Tensor,
) -> torch.Tensor:
    """``grad_y @ W`` ``[M, K]``: the kernel over the transposed structure, whose values are ``values[permutation]``;
    an op of its own so compiled backward graphs trace it."""
    grad_x = grad_y.new_empty((grad_y.shape[0], transposed_bitmap.shape[0]))
    return bitmap_matmul(
        grad_y.t(), values[permutation], transposed_bitmap, transposed_offsets, grad_x,
        input_precision=input_precision(grad_y.dtype),
    )


def _grad_input_fake(
    grad_y: torch.Tensor, values: torch.Tensor, permutation: torch.Tensor, transposed_bitmap: torch.Tensor,
    *_: object,
) -> torch.Tensor:
    return grad_y.new_empty((grad_y.shape[0], transposed_bitmap.shape[0]))


def _setup_backward(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, values, bitmap, block_offsets, bias, backend, *structures = inputs
    ctx.save_for_backward(x, values, bitmap, block_offsets, *structures)
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _backward(
    ctx: torch.autograd.function.FunctionCtx, x_rows: torch.Tensor, grad_rows: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients for the activations (``dY @ W``, the kernel over the transposed structure) and for the kept
    weights only (CSR's SDDMM of ``dY.T`` and ``x.T`` at the kept positions), from ``[M, ...]`` rows."""
    _, values, bitmap, block_offsets, row_indices, col_indices, *transposed = ctx.saved_tensors
    need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    shape = (bitmap.shape[0], x_rows.shape[1])
    weight = BitmapWeight._trusted(values.detach(), bitmap, block_offsets, shape)
    grad_x = grad_values = None
    if need_values:
        if row_indices is None:
            row_indices, col_indices = weight.coordinates()
        grad_values = csr_sddmm_op(grad_rows.t(), x_rows.t(), row_indices, col_indices, None, ctx.backend)
    if need_x and use_triton(ctx.backend, grad_rows.device):
        transposed_bitmap, transposed_offsets, permutation = (
            weight.transposed_structure() if transposed[0] is None else transposed
        )
        grad_x = bitmap_linear_grad_input_op(grad_rows, values, permutation, transposed_bitmap, transposed_offsets)
    elif need_x:
        compute = torch.promote_types(grad_rows.dtype, torch.float32)
        grad_x = (grad_rows.to(compute) @ weight.to_dense().to(compute)).to(grad_rows.dtype)
    return grad_x, grad_values


def _bitmap_linear_backward(ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor) -> tuple:
    # x is [M, K] in the op, in any leading shape in an eager call with a kept plan (planned_with_gradient).
    x, grad_rows = ctx.saved_tensors[0], as_rows(grad_y)
    grad_x, grad_values = _backward(ctx, as_rows(x), grad_rows)
    grad_bias = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    return (None if grad_x is None else grad_x.view(x.shape), grad_values, None, None, grad_bias) + (None,) * 6


def _bitmap_linear_feature_major_backward(ctx: torch.autograd.function.FunctionCtx, grad_y_t: torch.Tensor) -> tuple:
    grad_x, grad_values = _backward(ctx, ctx.saved_tensors[0].t(), grad_y_t.t())
    grad_bias = grad_y_t.sum(1) if ctx.has_bias and ctx.needs_input_grad[4] else None
    return (None if grad_x is None else grad_x.t(), grad_values, None, None, grad_bias) + (None,) * 6


_BITMAP_LINEAR = define_op(
    "nmspmm::bitmap_linear", _LINEAR_SCHEMA, _row_major_product, _row_major_fake, _setup_backward,
    _bitmap_linear_backward,
)
_BITMAP_LINEAR_FEATURE_MAJOR = define_op(
    "nmspmm::bitmap_linear_feature_major", _LINEAR_SCHEMA, _feature_major_product, _feature_major_fake,
    _setup_backward, _bitmap_linear_feature_major_backward,
)
_BITMAP_LINEAR_GRAD_INPUT = define_op(
    "nmspmm::bitmap_linear_grad_input",
    "(Tensor grad_y, Tensor values, Tensor permutation, Tensor transposed_bitmap, Tensor transposed_offsets) "
    "-> Tensor",
    _grad_input_product, _grad_input_fake,
)
# The custom ops themselves (torch.ops.nmspmm.*): what torch.compile traces and opcheck checks.
bitmap_linear_op = _BITMAP_LINEAR.op
bitmap_linear_feature_major_op = _BITMAP_LINEAR_FEATURE_MAJOR.op
bitmap_linear_grad_input_op = _BITMAP_LINEAR_GRAD_INPUT.op
