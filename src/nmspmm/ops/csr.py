"""Unstructured (CSR) sparse products: argument checks, the torch.library custom ops with their autograd
formulas, and dispatch to the Triton kernels (Sputnik-style SpMM and SDDMM; CUDA, or the CPU interpreter when
asked) or the dense reference."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..formats.csr import CSRWeight, dense_from_csr, row_indices_of, tile_offsets_of, transposed_structure_of
from ..kernels import transpose
from ..kernels.csr_spmm import CSRProduct, csr_spmm
from ..kernels.sddmm import CELL, TILED_MIN_DENSITY_EXACT, TILED_MIN_DEPTH, sddmm_tiled
from ..kernels.sddmm import sddmm as sddmm_kernel
from .backend import (
    ProductPlan, as_rows, call_op, check_backend, check_dtype_and_device, check_gradient_extent, check_int32_offsets,
    check_operands, define_op, input_precision, kept_plan, needs_grad, planned_with_gradient, reference_linear,
    use_triton,
)

# The products are torch.library custom ops (opaque to torch.compile, traced through their fake implementations).
# Besides the forward structure they take, optionally, the structures their backward reads: the row of every
# nonzero and the offsets of the tiled SDDMM (for the weight gradient) and the transposed structure (for the
# input gradient). Callers pass them, cached on the weight, only when autograd will need them; the backward
# derives any that are missing.
_LINEAR_SCHEMA = (
    "(Tensor x, Tensor values, Tensor col_indices, Tensor row_offsets, Tensor row_order, Tensor? bias, "
    "Tensor? row_indices, Tensor? cell_offsets, Tensor? transposed_offsets, Tensor? transposed_columns, "
    "Tensor? permutation, Tensor? transposed_order, str backend) -> Tensor"
)


def csr_linear(
    x: torch.Tensor, weight: CSRWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` of shape ``[..., K]`` and an unstructured sparse ``weight``: a contiguous
    ``[..., N]`` result in x's dtype.

    On CUDA this runs the Triton SpMM (never a silent dense fallback); on the CPU the dense reference.
    ``backend="triton"`` forces the kernels, which on the CPU needs ``TRITON_INTERPRET=1``.
    """
    plan = _kept_plan(x, weight, bias, backend, False)
    if plan is not None:
        if not needs_grad(x, weight.values, bias):
            return plan(x)
        return planned_with_gradient(
            _CSR_LINEAR, plan, _op_args(x, weight, bias, backend),
            lambda: check_gradient_extent(as_rows(x), weight.shape[0], "the CSR backward kernels (SDDMM)"),
        )
    check_operands(x, weight, CSRWeight, bias)
    check_backend(backend)
    rows_in = as_rows(x)
    if needs_grad(x, weight.values, bias) and use_triton(backend, x.device):
        check_gradient_extent(rows_in, weight.shape[0], "the CSR backward kernels (SDDMM)")
    y = call_op(_CSR_LINEAR, _op_args(rows_in, weight, bias, backend))
    return y.view(*x.shape[:-1], weight.shape[0])


def csr_linear_feature_major(
    x_t: torch.Tensor, weight: CSRWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """The same product on feature-major activations: ``x_t`` is ``[K, M]`` (``X.T``), the result ``[N, M]``.

    No transpose is needed on either side, so a chain of sparse layers can stay feature-major.
    """
    plan = _kept_plan(x_t, weight, bias, backend, True)
    if plan is not None and not needs_grad(x_t, weight.values, bias):
        return plan(x_t)
    check_operands(x_t, weight, CSRWeight, bias, feature_axis=0)
    if x_t.dim() != 2:
        raise ValueError(f"x_t: expected a 2-D [K, M] feature-major tensor, got shape {tuple(x_t.shape)}")
    check_backend(backend)
    if needs_grad(x_t, weight.values, bias) and use_triton(backend, x_t.device):
        check_gradient_extent(x_t.t(), weight.shape[0], "the CSR backward kernels (SDDMM)")
    args = _op_args(x_t, weight, bias, backend)
    return call_op(_CSR_LINEAR_FEATURE_MAJOR, args, plan)


def sddmm(a: torch.Tensor, b: torch.Tensor, weight: CSRWeight, *, backend: str = "auto") -> CSRWeight:
    """``a @ b.T`` sampled at ``weight``'s kept positions, for ``a`` [N, D] and ``b`` [K, D]: a :class:`CSRWeight`
    of the same structure (sharing its index tensors) holding the products, in the weight's dtype.

    Not differentiable (the weight gradient of :func:`csr_linear` uses it inside its own backward).
    """
    _check_sddmm_operands(a, b, weight)
    check_backend(backend)
    if use_triton(backend, a.device):
        check_int32_offsets("a", a, "the SDDMM kernels")
        check_int32_offsets("b", b, "the SDDMM kernels")
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        raise ValueError("a, b: sddmm is not differentiable; pass detached tensors (or call it under torch.no_grad())")
    tiled = use_triton(backend, a.device) and _takes_tiles(a.shape[1], a.dtype, weight.nnz, *weight.shape)
    cell_offsets = weight.tile_offsets(CELL) if tiled else None
    args = (a, b, weight.row_indices(), weight.col_indices, cell_offsets, backend)
    values = call_op(_CSR_SDDMM, args)
    return weight._with_values(values)


def _op_args(x: torch.Tensor, weight: CSRWeight, bias: torch.Tensor | None, backend: str) -> tuple:
    """The products' arguments: the forward structure, and the backward's structures where autograd will need
    them (they cost memory, so inference never derives them)."""
    grad = torch.is_grad_enabled()
    grad_values = grad and weight.values.requires_grad
    row_indices = weight.row_indices() if grad_values else None
    # The weight gradient is an SDDMM whose reduction runs over the tokens.
    tokens = x.numel() // weight.shape[1]
    tiled = use_triton(backend, x.device) and _takes_tiles(tokens, x.dtype, weight.nnz, *weight.shape)
    cell_offsets = weight.tile_offsets(CELL) if grad_values and tiled else None
    transposed = weight.transposed_structure() if grad and x.requires_grad else (None, None, None, None)
    offsets_t, columns_t, permutation, order_t = transposed
    return (
        x, weight.values, weight.col_indices, weight.row_offsets, weight.row_order(), bias,
        row_indices, cell_offsets, offsets_t, columns_t, permutation, order_t, backend,
    )  # fmt: skip


def _row_major_product(
    x: torch.Tensor,
    values: torch.Tensor,
    col_indices: torch.Tensor,
    row_offsets: torch.Tensor,
    row_order: torch.Tensor,
    bias: torch.Tensor | None,
    row_indices: torch.Tensor | None,
    cell_offsets: torch.Tensor | None,
    transposed_offsets: torch.Tensor | None,
    transposed_columns: torch.Tensor | None,
    permutation: torch.Tensor | None,
    transposed_order: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """``[M, N]`` = ``x`` ``[M, K]`` times the CSR weight's transpose, plus ``bias``; operands are trusted
    (:func:`csr_linear` checks them); the backward's structures are not read here."""
    if not use_triton(backend, x.device):
        return _reference(x, values, col_indices, row_offsets, bias)
    return _plan(tuple(x.shape), x.stride(), False, values, col_indices, row_offsets, row_order, bias)(x)


def _feature_major_product(
    x: torch.Tensor,
    values: torch.Tensor,
    col_indices: torch.Tensor,
    row_offsets: torch.Tensor,
    row_order: torch.Tensor,
    bias: torch.Tensor | None,
    row_indices: torch.Tensor | None,
    cell_offsets: torch.Tensor | None,
    transposed_offsets: torch.Tensor | None,
    transposed_columns: torch.Tensor | None,
    permutation: torch.Tensor | None,
    transposed_order: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """:func:`_row_major_product` on feature-major activations: ``x`` is ``[K, M]``, the result ``[N, M]``
    (contiguous)."""
    if not use_triton(backend, x.device):
        return _reference(x.t(), values, col_indices, row_offsets, bias).t().contiguous()
    return _plan(tuple(x.shape), x.stride(), True, values, col_indices, row_offsets, row_order, bias)(x)


def _plan(
    x_shape: tuple[int, ...],
    x_strides: tuple[int, ...],
    feature_major: bool,
    values: torch.Tensor,
    col_indices: torch.Tensor,
    row_offsets: torch.Tensor,
    row_order: torch.Tensor,
    bias: torch.Tensor | None,
) -> ProductPlan:
    """The SpMM's plan (:class:`backend.ProductPlan`): x transposed first unless its ``[K, M]`` view has unit
    token stride (or one token), as the gathers read fastest."""
    rows = row_offsets.shape[0] - 1

    def transposes(tokens: int, xt_strides: tuple[int, int]) -> bool:
        return xt_strides[1] != 1 and tokens != 1

    def make(
        xt_shape: tuple[int, int], xt_strides: tuple[int, int], out_strides: tuple[int, int]
    ) -> Callable[..., None]:
        return CSRProduct(
            xt_shape, xt_strides, (xt_shape[1], rows), out_strides, values, col_indices, row_offsets, row_order,
            bias,
        )

    return ProductPlan(x_shape, x_strides, feature_major, rows, transposes, make)


def _kept_plan(
    x: torch.Tensor, weight: CSRWeight, bias: torch.Tensor | None, backend: str, feature_major: bool
) -> ProductPlan | None:
    """The weight's kept plan for this layout of ``x`` (:func:`backend.kept_plan`), or None where the call takes
    the full path."""

    def make() -> ProductPlan:
        return _plan(
            tuple(x.shape), x.stride(), feature_major, weight.values, weight.col_indices, weight.row_offsets,
            weight.row_order(), bias,
        )

    return kept_plan(x, weight, CSRWeight, bias, backend, feature_major, make)


def _row_major_fake(
    x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, row_offsets: torch.Tensor, *_: object
) -> torch.Tensor:
    return x.new_empty((x.shape[0], row_offsets.shape[0] - 1))


def _feature_major_fake(
    x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, row_offsets: torch.Tensor, *_: object
) -> torch.Tensor:
    return x.new_empty((row_offsets.shape[0] - 1, x.shape[1]))


def _sampled_product(
    a: torch.Tensor,
    b: torch.Tensor,
    row_indices: torch.Tensor,
    col_indices: torch.Tensor,
    cell_offsets: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """``(a @ b.T)[row_indices, col_indices]`` ``[nnz]`` in a's dtype, for ``a`` [R, D] and ``b`` [C, D] (any
    strides): the SDDMM kernel (per tile on tensor cores for reductions of at least ``TILED_MIN_DEPTH``,
    except exact fp32 below ``TILED_MIN_DENSITY_EXACT``; per nonzero otherwise), or on the reference path the
    dense product in at least fp32, then sampled. ``cell_offsets`` (the structure's offsets per ``CELL`` columns,
    cached on the weight) spare the tiled kernel deriving them."""
    if not use_triton(backend, a.device):
        compute = torch.promote_types(a.dtype, torch.float32)
        full = a.to(compute) @ b.to(compute).t()
        return full[row_indices.long(), col_indices.long()].to(a.dtype)
    out = a.new_empty(col_indices.shape[0])
    a, b = _unit_inner_stride(a), _unit_inner_stride(b)
    if _takes_tiles(a.shape[1], a.dtype, col_indices.shape[0], a.shape[0], b.shape[0]):
        if cell_offsets is None:
            cell_offsets = tile_offsets_of(row_indices, col_indices, a.shape[0], b.shape[0], CELL)
        return sddmm_tiled(a, b, cell_offsets, col_indices, out, input_precision(a.dtype))
    return sddmm_kernel(a, b, row_indices, col_indices, out)


def _takes_tiles(depth: int, dtype: torch.dtype, nnz: int, rows: int, cols: int) -> bool:
    """Whether the Triton SDDMM of a ``depth``-long reduction over a ``[rows, cols]`` structure of ``nnz`` entries
    runs per tile (reading the cell offsets) rather than per nonzero."""
    density = nnz / max(1, rows * cols)
    return depth >= TILED_MIN_DEPTH and (input_precision(dtype) != "tf32x3" or density >= TILED_MIN_DENSITY_EXACT)


def _sampled_fake(a: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor, col_indices: torch.Tensor, *_: object):
    return a.new_empty(col_indices.shape[0])


def _grad_input_product(
    grad_y: torch.Tensor,
    values: torch.Tensor,
    permutation: torch.Tensor,
    transposed_offsets: torch.Tensor,
    transposed_columns: torch.Tensor,
    transposed_order: torch.Tensor,
) -> torch.Tensor:
    """``grad_y @ W`` ``[M, K]``: the Triton SpMM over the transposed structure, whose values are
    ``values[permutation]``; an op of its own so compiled backward graphs trace it."""
    grad_x = grad_y.new_empty((grad_y.shape[0], transposed_offsets.shape[0] - 1))
    grad_y_t = _unit_inner_stride(grad_y.t())
    return csr_spmm(grad_y_t, values[permutation], transposed_columns, transposed_offsets, transposed_order, grad_x)


def _grad_input_fake(
    grad_y: torch.Tensor, values: torch.Tensor, permutation: torch.Tensor, transposed_offsets: torch.Tensor, *_: object
) -> torch.Tensor:
    return grad_y.new_empty((grad_y.shape[0], transposed_offsets.shape[0] - 1))


def _setup_backward(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, values, col_indices, row_offsets, _, bias, row_indices, cell_offsets, *transposed, backend = inputs
    ctx.save_for_backward(x, values, col_indices, row_offsets, row_indices, cell_offsets, *transposed)
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _backward(
    ctx: torch.autograd.function.FunctionCtx, x_rows: torch.Tensor, grad_rows: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients for the activations (``dY @ W``, an SpMM over the transposed structure) and for the kept
    weights only (the SDDMM of ``dY.T`` and ``x.T`` at the kept positions), from ``[M, ...]`` rows."""
    _, values, col_indices, row_offsets, row_indices, cell_offsets, *transposed = ctx.saved_tensors
    need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    rows, cols = row_offsets.shape[0] - 1, x_rows.shape[1]
    triton_x = need_x and use_triton(ctx.backend, grad_rows.device)
    if row_indices is None and (need_values or (need_x and (not triton_x or transposed[0] is None))):
        row_indices = row_indices_of(row_offsets, values.shape[0])
    grad_x = grad_values = None
    if need_values:
        grad_values = csr_sddmm_op(grad_rows.t(), x_rows.t(), row_indices, col_indices, cell_offsets, ctx.backend)
    if triton_x:
        if transposed[0] is None:
            transposed = transposed_structure_of(row_indices, col_indices, cols)
        offsets_t, columns_t, permutation, order_t = transposed
        grad_x = csr_linear_grad_input_op(grad_rows, values, permutation, offsets_t, columns_t, order_t)
    elif need_x:
        compute = torch.promote_types(grad_rows.dtype, torch.float32)
        dense = dense_from_csr(values.to(compute), row_indices, col_indices, (rows, cols))
        grad_x = (grad_rows.to(compute) @ dense).to(grad_rows.dtype)
    return grad_x, grad_values


def _csr_linear_backward(ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor) -> tuple:
    # x is [M, K] in the op, in any leading shape in an eager call with a kept plan (planned_with_gradient).
    x, grad_rows = ctx.saved_tensors[0], as_rows(grad_y)
    grad_x, grad_values = _backward(ctx, as_rows(x), grad_rows)
    grad_bias = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[5] else None
    return (None if grad_x is None else grad_x.view(x.shape), grad_values, None, None, None, grad_bias) + (None,) * 7


def _csr_linear_feature_major_backward(ctx: torch.autograd.function.FunctionCtx, grad_y_t: torch.Tensor) -> tuple:
    grad_x, grad_values = _backward(ctx, ctx.saved_tensors[0].t(), grad_y_t.t())
    grad_bias = grad_y_t.sum(1) if ctx.has_bias and ctx.needs_input_grad[5] else None
    return (None if grad_x is None else grad_x.t(), grad_values, None, None, None, grad_bias) + (None,) * 7


_CSR_LINEAR = define_op(
    "nmspmm::csr_linear", _LINEAR_SCHEMA, _row_major_product, _row_major_fake, _setup_backward, _csr_linear_backward
)
_CSR_LINEAR_FEATURE_MAJOR = define_op(
    "nmspmm::csr_linear_feature_major", _LINEAR_SCHEMA, _feature_major_product, _feature_major_fake, _setup_backward,
    _csr_linear_feature_major_backward,
)
_CSR_SDDMM = define_op(
    "nmspmm::csr_sddmm",
    "(Tensor a, Tensor b, Tensor row_indices, Tensor col_indices, Tensor? cell_offsets, str backend) -> Tensor",
    _sampled_product, _sampled_fake,
)
_CSR_LINEAR_GRAD_INPUT = define_op(
    "nmspmm::csr_linear_grad_input",
    "(Tensor grad_y, Tensor values, Tensor permutation, Tensor transposed_offsets, Tensor transposed_columns, "
    "Tensor transposed_order) -> Tensor",
    _grad_input_product, _grad_input_fake,
)
# The custom ops themselves (torch.ops.nmspmm.*): what torch.compile traces and opcheck checks.
csr_linear_op = _CSR_LINEAR.op
csr_linear_feature_major_op = _CSR_LINEAR_FEATURE_MAJOR.op
csr_sddmm_op = _CSR_SDDMM.op
csr_linear_grad_input_op = _CSR_LINEAR_GRAD_INPUT.op


def _unit_inner_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` [R, C] with unit stride along C, as the kernels read fastest: itself when it has one (or C = 1),
    else a tiled transposed copy (a transposed view's ``.contiguous()`` reaches a fraction of copy bandwidth)."""
    if t.stride(1) == 1 or t.shape[1] == 1:
        return t
    return transpose(t.t())


def _reference(
    rows_in: torch.Tensor,
    values: torch.Tensor,
    col_indices: torch.Tensor,
    row_offsets: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Dense reference: the product over the densified weight (:func:`backend.reference_linear`)."""
    shape = (row_offsets.shape[0] - 1, rows_in.shape[1])
    rows = row_indices_of(row_offsets, values.shape[0])

    def kept() -> torch.Tensor:
        mask = torch.zeros(shape, dtype=torch.bool, device=values.device)
        mask[rows.long(), col_indices.long()] = True
        return mask

    return reference_linear(rows_in, dense_from_csr(values, rows, col_indices, shape), kept, bias)


def _check_sddmm_operands(a: torch.Tensor, b: torch.Tensor, weight: CSRWeight) -> None:
    """Check ``a`` [N, D] and ``b`` [K, D] against ``weight`` [N, K]: tensors of its dtype and device, D >= 1."""
    if not isinstance(weight, CSRWeight):
        raise TypeError(f"weight: expected an nmspmm.CSRWeight, got {type(weight).__name__}")
    for name, operand, rows in (("a", a, weight.shape[0]), ("b", b, weight.shape[1])):
        if not isinstance(operand, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(operand).__name__}")
        check_dtype_and_device(name, operand, weight)
        if operand.dim() != 2 or operand.shape[0] != rows or operand.shape[1] < 1:
            dim = "N" if name == "a" else "K"
            raise ValueError(f"{name}: expected shape [{dim}={rows}, D] with D >= 1, got {tuple(operand.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"b: expected D={a.shape[1]} columns like a, got shape {tuple(b.shape)}")
