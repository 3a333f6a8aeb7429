"""Vector- and element-wise N:M products: argument checks, the torch.library custom ops with their autograd
formulas, and dispatch to the Triton kernels (CUDA, or the CPU interpreter when asked) or the dense reference."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..formats import NMSparseWeight, QuantizedNMWeight
from ..formats.nm import dense_from_kept, kept_row_columns
from ..kernels import choose_vector_config, nm_grad_input, nm_grad_values, transpose
from ..kernels.nm_element import ElementProduct, choose_element_config
from ..kernels.nm_vector import VectorProduct
from .backend import (
    Op, ProductPlan, as_rows, call_op, check_backend, check_gradient_extent, check_operands, define_op,
    input_precision, kept_plan, needs_grad, planned_with_gradient, reference_linear, use_triton,
)

# Up to this many tokens the vector-wise product reads x row-major in one launch (see _reads_rows); more tokens
# are transposed first, so that every gathered feature is one contiguous row.
ROW_MAJOR_TOKENS = 16

# The products are torch.library custom ops, opaque to torch.compile (traced through their fake
# implementations) and holding only tensors and scalars, so an autograd formula can be registered on them.
# ``kept_bits``: the element-wise kernel's bitmap where the weight's holder keeps one (NMSparseWeight.kept_bitmap).
_OP_SCHEMA = (
    "(Tensor x, Tensor values, Tensor kept_offsets, Tensor? bias, int n, int m, int vector, str backend, "
    "Tensor? kept_bits=None) -> Tensor"
)


def nm_linear(
    x: torch.Tensor, weight: NMSparseWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` of shape ``[..., K]``: a contiguous ``[..., N]`` result in x's dtype.

    On CUDA this runs the Triton kernels (never a silent dense fallback); on the CPU the dense reference.
    ``backend="triton"`` forces the kernels, which on the CPU needs ``TRITON_INTERPRET=1``. A
    :class:`QuantizedNMWeight` goes to :func:`nm_quantized_linear`.
    """
    if isinstance(weight, QuantizedNMWeight):
        return nm_quantized_linear(x, weight, bias, backend=backend)
    plan = _kept_plan(x, weight, bias, backend, False)
    if plan is not None and not needs_grad(x, weight.values, bias):
        return plan(x)

    def args(rows: torch.Tensor) -> tuple:
        return (
            rows, weight.values, weight.kept_offsets(), bias, weight.n, weight.m, weight.vector, backend,
            weight.kept_bitmap(),
        )

    return _row_major_call(x, weight, NMSparseWeight, bias, backend, _NM_LINEAR, args, plan)


def nm_linear_feature_major(
    x_t: torch.Tensor, weight: NMSparseWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """The same product on feature-major activations: ``x_t`` is ``[K, M]`` (``X.T``), the result ``[N, M]``.

    No transpose is needed on either side, so a chain of sparse layers can stay feature-major. Not for a
    :class:`QuantizedNMWeight` (:func:`nm_quantized_linear` reads row-major activations).
    """
    if isinstance(weight, QuantizedNMWeight):
        raise TypeError(
            "weight: linear_feature_major takes unquantized weights; call nmspmm.linear(x, weight) with a "
            "QuantizedNMWeight"
        )
    plan = _kept_plan(x_t, weight, bias, backend, True)
    if plan is not None and not needs_grad(x_t, weight.values, bias):
        return plan(x_t)
    check_operands(x_t, weight, NMSparseWeight, bias, feature_axis=0)
    if x_t.dim() != 2:
        raise ValueError(f"x_t: expected a 2-D [K, M] feature-major tensor, got shape {tuple(x_t.shape)}")
    check_backend(backend)
    if needs_grad(x_t, weight.values, bias) and use_triton(backend, x_t.device):
        check_gradient_extent(x_t.t(), weight.shape[0], "the N:M backward kernels")
    args = (
        x_t, weight.values, weight.kept_offsets(), bias, weight.n, weight.m, weight.vector, backend,
        weight.kept_bitmap(),
    )
    return call_op(_NM_LINEAR_FEATURE_MAJOR, args, plan)


def nm_quantized_linear(
    x: torch.Tensor, weight: QuantizedNMWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """``x @ weight.T + bias`` for a :class:`QuantizedNMWeight` (8-bit kept values, one fp32 scale per output
    feature) and ``x`` ``[..., K]`` in the weight's :attr:`~QuantizedNMWeight.dtype`: a contiguous ``[..., N]``
    result in that dtype, the product with the dequantized weight. The kernels dequantize in registers (weight-only
    quantization: the activations keep their dtype). Gradients flow to ``x`` and ``bias``; the quantized values
    and scales have none (values or scales that require grad are refused)."""
    if not isinstance(weight, QuantizedNMWeight):
        raise TypeError(f"weight: expected an nmspmm.QuantizedNMWeight, got {type(weight).__name__}")
    if weight.values.requires_grad or weight.scales.requires_grad:
        raise ValueError(
            "weight: its values or scales require grad, but a QuantizedNMWeight has no gradient; train the "
            "unquantized NMSparseWeight, then quantize it"
        )
    plan = _kept_plan(x, weight, bias, backend, False)
    if plan is not None and not needs_grad(x, weight.values, bias):
        return plan(x)

    def args(rows: torch.Tensor) -> tuple:
        return (
            rows, weight.values, weight.kept_offsets(), weight.scales, bias, weight.n, weight.m, weight.vector,
            backend, weight.kept_bitmap(),
        )

    return _row_major_call(x, weight, QuantizedNMWeight, bias, backend, _NM_QUANTIZED_LINEAR, args, plan)


def _row_major_call(
    x: torch.Tensor,
    weight: NMSparseWeight,
    weight_type: type,
    bias: torch.Tensor | None,
    backend: str,
    defined: Op,
    args: Callable[[torch.Tensor], tuple],
    plan: ProductPlan | None,
) -> torch.Tensor:
    """The row-major N:M products (``defined``, with the op's arguments ``args(rows)`` for activations ``rows``)
    past their fast path (a kept ``plan`` without gradient, which the callers run themselves): the kept plan
    inside the op's autograd function where a gradient is needed, else the checks, then the op on ``x`` as
    ``[M, K]`` rows."""
    if plan is not None:
        return planned_with_gradient(
            defined, plan, args(x),
            lambda: check_gradient_extent(as_rows(x), weight.shape[0], "the N:M backward kernels"),
        )
    check_operands(x, weight, weight_type, bias)
    check_backend(backend)
    flat = x.dim() == 2
    rows_in = x if flat else as_rows(x)
    if needs_grad(x, weight.values, bias) and use_triton(backend, x.device):
        check_gradient_extent(rows_in, weight.shape[0], "the N:M backward kernels")
    y = call_op(defined, args(rows_in))
    return y if flat else y.view(*x.shape[:-1], weight.shape[0])


def _quantized_product(
    x: torch.Tensor,
    values: torch.Tensor,
    kept_offsets: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    m: int,
    vector: int,
    backend: str,
    kept_bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[M, N]`` = ``x`` ``[M, K]`` times the weight ``values * scales[:, None]`` (8-bit ``values``) at the kept
    positions, plus ``bias``, in x's dtype; operands are trusted (:func:`nm_quantized_linear` checks them)."""
    if not use_triton(backend, x.device):
        dequantized = values.to(scales.dtype) * scales[:, None]
        return _reference(x, dequantized, kept_offsets, bias, n, m, vector)
    return _plan(
        tuple(x.shape), x.stride(), False, values, kept_offsets, bias, n, m, vector, scales, x.dtype, kept_bits
    )(x)


def _quantized_fake(x: torch.Tensor, values: torch.Tensor, *_: object) -> torch.Tensor:
    return x.new_empty((x.shape[0], values.shape[0]))


def _setup_quantized_backward(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, values, kept_offsets, scales, bias, n, m, vector, backend, _ = inputs
    ctx.save_for_backward(values, kept_offsets, scales)
    ctx.pattern = (n, m, vector, backend)
    ctx.has_bias = bias is not None


def _quantized_backward(ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor) -> tuple:
    """The activations' gradient ``dY @ W`` through the dequantized weight (built for the call) and the bias's;
    none for the quantized values and scales."""
    values, kept_offsets, scales = ctx.saved_tensors
    n, m, vector, backend = ctx.pattern
    grad_rows = as_rows(grad_y)
    grad_x = None
    if ctx.needs_input_grad[0]:
        cols = kept_offsets.shape[1] // n * m
        dequantized = (values.to(scales.dtype) * scales[:, None]).to(grad_y.dtype)
        rows = grad_input(grad_rows, dequantized, kept_offsets, n, m, vector, cols, backend)
        grad_x = rows.view(*grad_y.shape[:-1], cols)
    grad_bias = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    return grad_x, None, None, None, grad_bias, None, None, None, None, None


def _row_major_product(
    x: torch.Tensor,
    values: torch.Tensor,
    kept_offsets: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    m: int,
    vector: int,
    backend: str,
    kept_bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[M, N]`` = ``x`` ``[M, K]`` times the N:M weight given by ``values`` and ``kept_offsets`` (as
    :meth:`NMSparseWeight.kept_offsets`), plus ``bias``; operands are trusted (:func:`linear` checks them)."""
    if not use_triton(backend, x.device):
        return _reference(x, values, kept_offsets, bias, n, m, vector)
    return _plan(tuple(x.shape), x.stride(), False, values, kept_offsets, bias, n, m, vector, kept_bits=kept_bits)(x)


def _reads_rows(tokens: int, vector: int) -> bool:
    """Whether the product reads row-major ``x`` [M, K] directly (one launch) rather than a feature-major copy (a
    transpose launch first). The element-wise kernel (V=1) reads whole tiles of x, contiguous either way, so it
    always reads rows. From row-major x the vector-wise kernel gathers element by element, one K step ahead of its
    product (``kernels.nm_vector.gathers_ahead``): up to 16 tokens that ran at 0.78-1.20x the speed of the
    transposed path with its transpose (geomean 1.04x at 8 tokens, 0.99x at 16), 0.87-1.07x at 32 and 0.66-0.89x
    at 64 (H200, ``docs/perf-notes.md``, session 12), while the transpose's launch and allocation cost more host
    time than most decode products take on the GPU. :data:`ROW_MAJOR_TOKENS` is where that balance turns."""
    return vector == 1 or tokens <= ROW_MAJOR_TOKENS


def _row_major_fake(x: torch.Tensor, values: torch.Tensor, *_: object) -> torch.Tensor:
    return x.new_empty((x.shape[0], values.shape[0]))


def _feature_major_product(
    x: torch.Tensor,
    values: torch.Tensor,
    kept_offsets: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    m: int,
    vector: int,
    backend: str,
    kept_bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`_row_major_product` on feature-major activations: ``x`` is ``[K, M]``, the result ``[N, M]``,
    contiguous."""
    if not use_triton(backend, x.device):
        return _reference(x.t(), values, kept_offsets, bias, n, m, vector).t().contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    return _plan(tuple(x.shape), x.stride(), True, values, kept_offsets, bias, n, m, vector, kept_bits=kept_bits)(x)


def _feature_major_fake(x: torch.Tensor, values: torch.Tensor, *_: object) -> torch.Tensor:
    return x.new_empty((values.shape[0], x.shape[1]))


def _setup_backward(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, values, kept_offsets, bias, n, m, vector, backend, _ = inputs
    ctx.save_for_backward(x, values, kept_offsets)
    ctx.pattern = (n, m, vector, backend)
    ctx.has_bias = bias is not None


def _backward(
    ctx: torch.autograd.function.FunctionCtx, x_rows: torch.Tensor, grad_rows: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients for the activations (``dY @ W``, the transposed sparse structure) and for the kept
    weights only (the sampled product of ``dY.T`` and ``x`` at the kept positions), both ``[M, ...]`` rows."""
    _, values, kept_offsets = ctx.saved_tensors
    n, m, vector, backend = ctx.pattern
    grad_x = grad_values = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_input(grad_rows, values, kept_offsets, n, m, vector, x_rows.shape[1], backend)
    if ctx.needs_input_grad[1]:
        if use_triton(backend, grad_rows.device):
            grad_values = nm_linear_grad_values_op(x_rows, grad_rows, kept_offsets, n, m, vector)
        else:
            compute = torch.promote_types(grad_rows.dtype, torch.float32)
            full = grad_rows.to(compute).t() @ x_rows.to(compute)
            grad_values = full.gather(1, kept_row_columns(kept_offsets, n, m, vector)).to(values.dtype)
    return grad_x, grad_values


def grad_input(
    grad_rows: torch.Tensor,
    values: torch.Tensor,
    kept_offsets: torch.Tensor,
    n: int,
    m: int,
    vector: int,
    cols: int,
    backend: str,
) -> torch.Tensor:
    """``grad_rows @ W`` ``[M, cols]`` for the N:M weight ``W`` (the activations' gradient): the Triton kernel,
    or the dense reference in at least fp32."""
    if use_triton(backend, grad_rows.device):
        return nm_linear_grad_input_op(grad_rows, values, kept_offsets, n, m, vector, cols)
    compute = torch.promote_types(grad_rows.dtype, torch.float32)
    dense = dense_from_kept(values, kept_offsets, n, m, vector).to(compute)
    return (grad_rows.to(compute) @ dense).to(grad_rows.dtype)


def _grad_input_product(
    grad_y: torch.Tensor, values: torch.Tensor, kept_offsets: torch.Tensor, n: int, m: int, vector: int, cols: int
) -> torch.Tensor:
    """``grad_y @ W`` ``[M, cols]`` by the Triton kernel; an op of its own so compiled backward graphs trace it."""
    return nm_grad_input(
        grad_y, values.contiguous(), kept_offsets.contiguous(), n, m, vector, cols,
        input_precision=input_precision(values.dtype),
    )


def _grad_input_fake(
    grad_y: torch.Tensor, values: torch.Tensor, kept_offsets: torch.Tensor, n: int, m: int, vector: int, cols: int
) -> torch.Tensor:
    return grad_y.new_empty((grad_y.shape[0], cols))


def _grad_values_product(
    x: torch.Tensor, grad_y: torch.Tensor, kept_offsets: torch.Tensor, n: int, m: int, vector: int
) -> torch.Tensor:
    """The kept weights' gradient ``[N, K*n/m]`` (SDDMM of ``grad_y.T`` and ``x`` ``[M, K]``) by the Triton kernel."""
    return nm_grad_values(
        transpose(x), grad_y, kept_offsets.contiguous(), n, m, vector, input_precision=input_precision(x.dtype)
    )


def _grad_values_fake(x: torch.Tensor, grad_y: torch.Tensor, kept_offsets: torch.Tensor, *_: int) -> torch.Tensor:
    return grad_y.new_empty((grad_y.shape[1], kept_offsets.shape[1]))


def _nm_linear_backward(ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor) -> tuple:
    # x is [M, K] in the op, in any leading shape in an eager call with a kept plan (planned_with_gradient).
    x = ctx.saved_tensors[0]
    grad_rows = as_rows(grad_y)
    grad_x, grad_values = _backward(ctx, as_rows(x), grad_rows)
    grad_bias = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return None if grad_x is None else grad_x.view(x.shape), grad_values, None, grad_bias, None, None, None, None, None


def _nm_linear_feature_major_backward(ctx: torch.autograd.function.FunctionCtx, grad_y_t: torch.Tensor) -> tuple:
    x_t = ctx.saved_tensors[0]
    grad_x, grad_values = _backward(ctx, x_t.t(), grad_y_t.t())
    grad_bias = grad_y_t.sum(1) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return None if grad_x is None else grad_x.t(), grad_values, None, grad_bias, None, None, None, None, None


_NM_LINEAR = define_op(
    "nmspmm::nm_linear", _OP_SCHEMA, _row_major_product, _row_major_fake, _setup_backward, _nm_linear_backward
)
_NM_LINEAR_FEATURE_MAJOR = define_op(
    "nmspmm::nm_linear_feature_major", _OP_SCHEMA, _feature_major_product, _feature_major_fake, _setup_backward,
    _nm_linear_feature_major_backward,
)
_NM_LINEAR_GRAD_INPUT = define_op(
    "nmspmm::nm_linear_grad_input",
    "(Tensor grad_y, Tensor values, Tensor kept_offsets, int n, int m, int vector, int cols) -> Tensor",
    _grad_input_product, _grad_input_fake,
)
_NM_LINEAR_GRAD_VALUES = define_op(
    "nmspmm::nm_linear_grad_values",
    "(Tensor x, Tensor grad_y, Tensor kept_offsets, int n, int m, int vector) -> Tensor",
    _grad_values_product, _grad_values_fake,
)
_NM_QUANTIZED_LINEAR = define_op(
    "nmspmm::nm_quantized_linear",
    "(Tensor x, Tensor values, Tensor kept_offsets, Tensor scales, Tensor? bias, int n, int m, int vector, "
    "str backend, Tensor? kept_bits=None) -> Tensor",
    _quantized_product, _quantized_fake, _setup_quantized_backward, _quantized_backward,
)
# The custom ops themselves (torch.ops.nmspmm.*): what torch.compile traces and opcheck checks.
nm_linear_op = _NM_LINEAR.op
nm_linear_feature_major_op = _NM_LINEAR_FEATURE_MAJOR.op
nm_linear_grad_input_op = _NM_LINEAR_GRAD_INPUT.op
nm_linear_grad_values_op = _NM_LINEAR_GRAD_VALUES.op
nm_quantized_linear_op = _NM_QUANTIZED_LINEAR.op


def _plan(
    x_shape: tuple[int, ...],
    x_strides: tuple[int, ...],
    feature_major: bool,
    values: torch.Tensor,
    kept_offsets: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    m: int,
    vector: int,
    scales: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    kept_bits: torch.Tensor | None = None,
) -> ProductPlan:
    """The N:M product's plan (:class:`backend.ProductPlan`): x read row-major in one launch up to
    :data:`ROW_MAJOR_TOKENS` (:func:`_reads_rows`) or at V=1, transposed first from there; the element-wise kernel
    at V=1, else the vector-wise one, each with the config of its token count. With ``scales``, ``values`` are
    8-bit and ``dtype`` is the activations' (the configs and precision are those of that dtype). ``kept_bits``: the
    element-wise kernel's bitmap, where the caller holds one."""
    # The kernels index values, offsets and bias as contiguous rows; contiguous() returns them as they are.
    values, kept_offsets = values.contiguous(), kept_offsets.contiguous()
    bias = None if bias is None else bias.contiguous()
    scales = None if scales is None else scales.contiguous()
    rows = values.shape[0]
    compute = values.dtype if dtype is None else dtype

    def transposes(tokens: int, xt_strides: tuple[int, int]) -> bool:
        return not feature_major and not _reads_rows(tokens, vector)

    def make(
        xt_shape: tuple[int, int], xt_strides: tuple[int, int], out_strides: tuple[int, int]
    ) -> Callable[..., None]:
        if vector == 1:
            config = choose_element_config(xt_shape[1], rows, xt_shape[0], m, compute, values.device)
            return ElementProduct(
                xt_shape, xt_strides, out_strides, values, kept_offsets, n, m, config, bias,
                input_precision(compute), scales, compute, kept_bits,
            )
        config = choose_vector_config(
            xt_shape[1], rows, values.shape[1], vector, compute, values.device, eight_bit=scales is not None
        )
        return VectorProduct(
            xt_shape, xt_strides, out_strides, values, kept_offsets, n, m, vector, config, bias,
            input_precision(compute), scales, compute,
        )

    return ProductPlan(x_shape, x_strides, feature_major, rows, transposes, make)


def _kept_plan(
    x: torch.Tensor, weight: NMSparseWeight, bias: torch.Tensor | None, backend: str, feature_major: bool
) -> ProductPlan | None:
    """The weight's kept plan for this layout of ``x`` (:func:`backend.kept_plan`; with its scales for a
    :class:`QuantizedNMWeight`), or None where the call takes the full path."""
    scales = weight.scales if isinstance(weight, QuantizedNMWeight) else None
    if scales is not None and not scales.is_contiguous():
        return None  # a plan would hold a contiguous copy, which later in-place updates would not reach

    def make() -> ProductPlan:
        return _plan(
            tuple(x.shape), x.stride(), feature_major, weight.values, weight.kept_offsets(), bias, weight.n,
            weight.m, weight.vector, scales, None if scales is None else weight.dtype, weight.kept_bitmap(),
        )

    return kept_plan(x, weight, type(weight), bias, backend, feature_major, make)


def _reference(
    rows_in: torch.Tensor,
    values: torch.Tensor,
    kept_offsets: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    m: int,
    vector: int,
) -> torch.Tensor:
    """Dense reference: the product over the densified weight (:func:`backend.reference_linear`)."""

    def kept() -> torch.Tensor:
        mask = torch.zeros(values.shape[0], kept_offsets.shape[1] // n * m, dtype=torch.bool, device=values.device)
        return mask.scatter_(1, kept_row_columns(kept_offsets, n, m, vector), True)

    return reference_linear(rows_in, dense_from_kept(values, kept_offsets, n, m, vector), kept, bias)
