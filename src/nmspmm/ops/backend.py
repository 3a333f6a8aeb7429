"""Backend choice shared by every format's ops: the Triton kernels (CUDA, or the CPU interpreter when asked)
or the dense reference on the CPU, and the precision of fp32 tensor-core products."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ..formats.base import SparseWeightBase
from ..kernels.launch import interpreter_requested, wide_offsets
from ..kernels.transpose import Transpose

BACKENDS = ("auto", "triton", "reference")


def check_backend(backend: str) -> None:
    """Reject a backend name not in :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def use_triton(backend: str, device: torch.device) -> bool:
    """True when the product on ``device`` runs the Triton kernels: always on CUDA (never a silent dense
    fallback), on the CPU only for ``backend="triton"`` under the interpreter; False means the reference."""
    check_backend(backend)
    if backend == "reference":
        return False
    if device.type == "cuda":
        return True
    if backend == "triton":
        if not interpreter_requested():
            raise ValueError("backend: 'triton' on the CPU needs TRITON_INTERPRET=1 set before triton is imported")
        return True
    return False


def input_precision(dtype: torch.dtype) -> str:
    """How ``tl.dot`` multiplies fp32 operands: tf32 when torch's matmul precision allows it (as torch.matmul
    does), else fp32 accuracy from three tf32 tensor-core products ("tf32x3": each operand split into a tf32
    part and its tf32 remainder). On an H100 this ran the vector-wise kernel 1.7-1.9x faster than FMA
    ("ieee") with a relative error of 1.5-2.6e-7 against float64, below cuBLAS fp32's 1.2e-6 (4096^3, 2026-11-23).
    Other dtypes ignore it."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "tf32x3"


class Op(NamedTuple):
    """A product registered by :func:`define_op`: the custom op (what torch.compile traces), its implementation
    (what an eager call without gradient runs) and, for a differentiable one, the ``torch.autograd.Function`` that
    eager calls with gradient run (the op's own formulas)."""

    op: Callable[..., torch.Tensor]
    implementation: Callable[..., torch.Tensor]
    eager_autograd: type[torch.autograd.Function] | None


def define_op(
    name: str,
    schema: str,
    implementation: Callable[..., torch.Tensor],
    fake: Callable[..., torch.Tensor],
    setup_context: Callable[..., None] | None = None,
    backward: Callable[..., tuple] | None = None,
) -> Op:
    """Register ``implementation`` as the custom op ``name`` (``"nmspmm::..."``, functional: it mutates nothing)
    with its fake (the output's shape and dtype, for torch.compile) and, given ``setup_context`` and ``backward``,
    its autograd formula; the one way every format's products are defined."""
    op = torch.library.custom_op(name, mutates_args=(), schema=schema)(implementation)
    op.register_fake(fake)
    eager = None
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
        eager = autograd_function(implementation, setup_context, backward)
    return Op(op, implementation, eager)


def call_op(defined: Op, args: tuple, run: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """The custom op while torch.compile traces; in eager mode ``run`` (by default the implementation; a kept
    launch plan computes the same from the same arguments) directly, through the op's ``torch.autograd.Function``
    where a gradient is needed (the op where it has none). The op's dispatch cost 0.1-0.3 ms of host time a call
    (H100 run of 2026-11-23), more than most products."""
    if torch.compiler.is_compiling():
        return defined.op(*args)
    run = defined.implementation if run is None else run
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return defined.op(*args) if defined.eager_autograd is None else defined.eager_autograd.apply(*args, run)
    return run(*args)


class ProductPlan:
    """One product prepared for one weight and one layout of its activations: the output's shape, whether they
    are transposed first (a tiled transpose into feature-major ``[K, M]``) and the kernel's prepared launch. Every
    Triton product of the N:M and CSR formats runs through one, and block-sparse ones too; eager calls keep theirs
    on the weight (:func:`kept_plan`), so that a repeated call costs its allocations and launches, not the checks
    and the config choice again.

    ``x`` is ``[..., K]`` row-major activations (2-D with any strides, or contiguous: :func:`plannable`), or with
    ``feature_major`` ``[K, M]``; the result is ``[..., N]`` (``N = rows``) or ``[N, M]``, contiguous.
    ``transposes(tokens, xt_strides)`` says whether the kernel wants x transposed first, given the strides of the
    ``[K, M]`` view of x; ``make(xt_shape, xt_strides, out_strides)`` prepares the kernel's launch, a callable
    ``(xt, out)`` writing the ``[M, N]`` product into ``out`` (both passed as tensors of those strides)."""

    __slots__ = ("sources", "gradient_checked", "_out_shape", "_xt_shape", "_transpose", "_product")

    def __init__(
        self,
        x_shape: tuple[int, ...],
        x_strides: tuple[int, ...],
        feature_major: bool,
        rows: int,
        transposes: Callable[[int, tuple[int, int]], bool],
        make: Callable[[tuple[int, int], tuple[int, int], tuple[int, int]], Callable[..., None]],
    ) -> None:
        self.sources: tuple = ()  # what a plan kept on a weight was built from (kept_plan)
        self.gradient_checked = False  # whether this layout of x passed the gradient kernels' checks
        self._transpose = None
        if feature_major:
            features, tokens = x_shape
            self._out_shape: tuple[int, ...] = (rows, tokens)
            xt_strides, out_strides = (x_strides[0], x_strides[1]), (1, tokens)
        else:
            features, tokens = x_shape[-1], math.prod(x_shape[:-1])
            self._out_shape = (*x_shape[:-1], rows)
            out_strides = (rows, 1)
            row_strides = (x_strides[0], x_strides[1]) if len(x_shape) == 2 else (features, 1)
            xt_strides = (row_strides[1], row_strides[0])
        if transposes(tokens, xt_strides):
            self._transpose = Transpose((tokens, features), (xt_strides[1], xt_strides[0]), (tokens, 1))
            xt_strides = (tokens, 1)
        self._xt_shape = (features, tokens)
        self._product = make(self._xt_shape, xt_strides, out_strides)

    def __call__(self, x: torch.Tensor, *operands: object) -> torch.Tensor:
        """The product of ``x``; ``operands`` (the custom op's other arguments, as :func:`call_op` passes them)
        are the plan's own."""
        out = x.new_empty(self._out_shape)
        if self._transpose is None:
            self._product(x, out)
        else:
            xt = x.new_empty(self._xt_shape)
            self._transpose(x, xt)
            self._product(xt, out)
        return out


# Plans kept per weight, at most this many (one per layout of x; prefill lengths add entries).
MAX_PLANS = 64


def kept_plan(
    x: torch.Tensor,
    weight: SparseWeightBase,
    weight_type: type,
    bias: torch.Tensor | None,
    backend: str,
    feature_major: bool,
    make: Callable[[], ProductPlan],
) -> ProductPlan | None:
    """The :class:`ProductPlan` ``weight`` keeps for this layout of ``x`` (shape, strides, dtype, device,
    ``backend``, ``feature_major`` and fp32's matmul precision), or the one ``make()`` builds (then kept), or None
    where the call takes the full path: ``weight`` is not a ``weight_type``, torch.compile traces, the product
    does not run the Triton kernels, or x or the weight has a layout a plan cannot take. A kept plan serves while
    the tensors it was built from (the weight's stored tensors and ``bias``) are the same objects; a hit skips
    every check, since the key implies those that depend on ``x``. Building runs the full checks first, so bad
    arguments get the product's clear errors. The one way every format keeps its plans."""
    if not isinstance(weight, weight_type) or not isinstance(x, torch.Tensor):
        return None
    if bias is not None and not isinstance(bias, torch.Tensor):
        return None
    if torch.compiler.is_compiling():
        return None
    precision = input_precision(x.dtype) if x.dtype is torch.float32 else None
    key = (x.shape, x.stride(), x.dtype, x.device, backend, feature_major, precision)
    sources = [getattr(weight, name) for name in weight.STATE_TENSORS]
    sources.append(bias)
    plans = weight.launch_plans
    plan = plans.get(key)
    if plan is not None and _same_objects(plan.sources, sources):
        return plan
    check_operands(x, weight, weight_type, bias, feature_axis=0 if feature_major else -1)
    check_backend(backend)
    if not use_triton(backend, x.device) or not plannable(x, feature_major):
        return None
    if not weight.values.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        return None  # a plan would hold contiguous copies, which later in-place updates would not reach
    plan = make()
    if len(plans) >= MAX_PLANS:
        plans.clear()
    plan.sources = tuple(sources)
    plans[key] = plan
    return plan


def planned_with_gradient(
    defined: Op, plan: ProductPlan, args: tuple, check_gradient: Callable[[], None]
) -> torch.Tensor:
    """An eager product that autograd records, run by its kept ``plan`` inside the op's autograd function on
    ``args`` as given (x in any leading shape: the formulas read rows, :func:`as_rows`), so the call adds no
    reshape or view of its own to the graph. ``check_gradient()`` (the gradient kernels' limits for this layout of
    x) runs once per plan."""
    if not plan.gradient_checked:
        check_gradient()
        plan.gradient_checked = True
    return defined.eager_autograd.apply(*args, plan)


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``[..., F]`` as ``[M, F]`` rows (a view where the layout allows): what the backward formulas read."""
    return tensor.reshape(-1, tensor.shape[-1])


def _same_objects(kept: tuple, current: tuple) -> bool:
    for a, b in zip(kept, current):
        if a is not b:
            return False
    return True


def needs_grad(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether autograd records a product of ``x``, kept ``values`` and ``bias`` (a plan then runs inside the op's
    ``torch.autograd.Function``, or the full path gives the backward's structures)."""
    return torch.is_grad_enabled() and (
        x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)
    )


def plannable(x: torch.Tensor, feature_major: bool) -> bool:
    """Whether a plan can take ``x`` as it is: 2-D (any strides) or contiguous row-major activations, contiguous
    ``[K, M]`` feature-major ones; other layouts take the full path, which copies them first."""
    if feature_major:
        return x.dim() == 2 and x.is_contiguous()
    return x.dim() == 2 or x.is_contiguous()


def autograd_function(
    implementation: Callable[..., torch.Tensor], setup_context: Callable[..., None], backward: Callable[..., tuple]
) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` with the setup and backward registered on a custom op, for eager calls
    (``Function.apply`` costs a fraction of the op dispatcher's host time). It is applied to the
    op's arguments followed by what computes the forward from them (``implementation``, or a kept launch plan
    that computes the same), so that the formulas see the op's inputs at the op's positions."""

    def forward(ctx: torch.autograd.function.FunctionCtx, *args_and_run: Any) -> torch.Tensor:
        *args, run = args_and_run
        output = run(*args)
        setup_context(ctx, tuple(args), output)
        return output

    def backward_(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor) -> tuple:
        return *backward(ctx, *grads), None

    name = f"{implementation.__name__.strip('_').title().replace('_', '')}Function"
    methods = {"forward": staticmethod(forward), "backward": staticmethod(backward_)}
    return type(name, (torch.autograd.Function,), methods)


def reference_linear(
    x: torch.Tensor, dense: torch.Tensor, kept: Callable[[], torch.Tensor], bias: torch.Tensor | None
) -> torch.Tensor:
    """The dense reference ``x @ dense.T + bias`` of every format, accumulated in at least fp32, with the sparse
    meaning the kernels have: a pruned weight is absent, so a NaN or infinite ``x`` at an input feature an output
    prunes does not reach that output (``NaN * 0`` would). ``kept()`` gives the ``[N, K]`` bool structure; it is
    built only when ``x`` holds such values."""
    out_dtype, compute = x.dtype, torch.promote_types(x.dtype, torch.float32)
    x, dense = x.to(compute), dense.to(compute)
    finite = torch.isfinite(x)
    if bool(finite.all()):
        y = x @ dense.t()
    else:
        y = torch.where(finite, x, 0.0) @ dense.t()
        rows, cols = (~finite).nonzero(as_tuple=True)
        # Each non-finite x[m, k] reaches the outputs that keep input k, and only those.
        reach = torch.where(kept()[:, cols].t(), x[rows, cols][:, None] * dense[:, cols].t(), 0.0)
        y = y.index_add(0, rows, reach)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(out_dtype)


def check_int32_offsets(name: str, tensor: torch.Tensor, kernels: str) -> None:
    """Refuse ``tensor`` (argument ``name``) where ``kernels`` would index it past int32 offsets (2**31 elements
    from its start), with an error that says so, instead of a wrong result."""
    if wide_offsets((tensor.shape, tensor.stride())):
        raise ValueError(
            f"{name}: shape {tuple(tensor.shape)} spans 2**31 elements or more, beyond the int32 offsets of "
            f"{kernels}; run it in parts (for example split the batch)"
        )


def check_gradient_extent(x_rows: torch.Tensor, out_features: int, kernels: str) -> None:
    """Refuse a product whose gradient kernels (``kernels``) would index the ``[M, K]`` activations or the
    ``[M, N]`` output gradient past int32 offsets."""
    check_int32_offsets("x", x_rows, kernels)
    tokens = x_rows.shape[0]
    if wide_offsets(extents=(tokens * out_features,)):
        raise ValueError(
            f"x: {tokens} tokens by {out_features} output features span 2**31 elements or more, beyond the int32 "
            f"offsets of {kernels}; run it in parts (for example split the batch)"
        )


def check_dtype_and_device(name: str, tensor: torch.Tensor, weight: SparseWeightBase | torch.Tensor) -> None:
    """Reject a tensor argument ``name`` of another dtype or device than ``weight`` (any format)."""
    if tensor.dtype != weight.dtype:
        raise TypeError(f"{name}: dtype {tensor.dtype} does not match weight dtype {weight.dtype}")
    if tensor.device != weight.device:
        raise ValueError(f"{name}: on {tensor.device}, but weight is on {weight.device}")


def check_bias(bias: torch.Tensor | None, weight: SparseWeightBase | torch.Tensor) -> None:
    """Reject a bias that is not None or an ``[N]`` tensor of the weight's dtype and device (any format)."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_dtype_and_device("bias", bias, weight)


def check_operands(
    x: torch.Tensor, weight: SparseWeightBase | torch.Tensor, weight_type: type, bias: torch.Tensor | None,
    feature_axis: int = -1,
) -> None:
    """Reject a weight of another format and an ``x`` (``x_t`` when ``feature_axis`` is 0) or ``bias`` of
    another dtype, device or feature count than ``weight``, with errors that name the argument."""
    name = "x" if feature_axis == -1 else "x_t"
    if not isinstance(weight, weight_type):
        raise TypeError(f"weight: expected an nmspmm.{weight_type.__name__}, got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    check_dtype_and_device(name, x, weight)
    if x.dim() == 0 or x.shape[feature_axis] != weight.shape[1]:
        axis = "last" if feature_axis == -1 else "first"
        raise ValueError(
            f"{name}: expected {axis} dimension K={weight.shape[1]} (in_features), got shape {tuple(x.shape)}"
        )
    check_bias(bias, weight)
