"""Torch-facing sparse products: argument checks, then dispatch to the Triton kernels (CUDA, or the CPU
interpreter when asked) or to the dense reference (CPU)."""

from __future__ import annotations

import torch

from .formats import NMSparseWeight
from .kernels import nm_element_matmul, nm_vector_matmul, transpose
from .kernels.launch import interpreter_active
from .perf import choose_vector_config

BACKENDS = ("auto", "triton", "reference")


def linear(
    x: torch.Tensor, weight: NMSparseWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` of shape ``[..., K]``: a contiguous ``[..., N]`` result in x's dtype.

    On CUDA this runs the Triton kernels (never a silent dense fallback); on the CPU the dense reference.
    ``backend="triton"`` forces the kernels, which on the CPU needs ``TRITON_INTERPRET=1``.
    """
    _check_operands(x, weight, bias, feature_axis=-1)
    use_triton = _use_triton(backend, x.device)
    rows_in = x.reshape(-1, weight.shape[1])
    if not use_triton:
        y = _reference(rows_in, weight, bias)
    else:
        y = torch.empty((rows_in.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
        # One token is already feature-major: the [1, K] row read as a [K, 1] column needs no copy.
        _launch(rows_in.t() if rows_in.shape[0] == 1 else transpose(rows_in), weight, bias, y)
    return y.view(*x.shape[:-1], weight.shape[0])


def linear_feature_major(
    x_t: torch.Tensor, weight: NMSparseWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """The same product on feature-major activations: ``x_t`` is ``[K, M]`` (``X.T``), the result ``[N, M]``.

    No transpose is needed on either side, so a chain of sparse layers can stay feature-major.
    """
    _check_operands(x_t, weight, bias, feature_axis=0)
    if x_t.dim() != 2:
        raise ValueError(f"x_t: expected a 2-D [K, M] feature-major tensor, got shape {tuple(x_t.shape)}")
    if not _use_triton(backend, x_t.device):
        return _reference(x_t.t(), weight, bias).t().contiguous()
    if x_t.stride(1) != 1:
        x_t = x_t.contiguous()
    y_t = torch.empty((weight.shape[0], x_t.shape[1]), dtype=x_t.dtype, device=x_t.device)
    _launch(x_t, weight, bias, y_t.t())
    return y_t


def _launch(x_t: torch.Tensor, weight: NMSparseWeight, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """Run the kernel for ``weight``'s layout, writing ``[M, N]`` results into ``out`` (any strides)."""
    if bias is not None:
        bias = bias.contiguous()
    if weight.vector == 1:
        nm_element_matmul(x_t, weight.values, weight.kept_offsets(), weight.n, weight.m, out, bias)
        return
    precision = "ieee"
    if weight.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        precision = "tf32"
    config = choose_vector_config(
        x_t.shape[1], weight.shape[0], weight.kept_per_row, weight.vector, weight.dtype, x_t.device
    )
    nm_vector_matmul(
        x_t, weight.values, weight.kept_offsets(), weight.n, weight.m, weight.vector, out, config, bias, precision
    )


def _reference(rows_in: torch.Tensor, weight: NMSparseWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Dense reference: the product over the densified weight, accumulated in at least fp32."""
    compute = torch.float32 if rows_in.dtype != torch.float32 else rows_in.dtype
    y = rows_in.to(compute) @ weight.to_dense().to(compute).t()
    if bias is not None:
        y += bias.to(compute)
    return y.to(rows_in.dtype)


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    if device.type == "cuda":
        return True
    if backend == "triton":
        if not interpreter_active():
            raise ValueError("backend: 'triton' on the CPU needs TRITON_INTERPRET=1 set before triton is imported")
        return True
    return False


def _check_operands(
    x: torch.Tensor, weight: NMSparseWeight, bias: torch.Tensor | None, feature_axis: int
) -> None:
    """Reject mismatched dtypes, devices and shapes with errors that name the argument."""
    name = "x" if feature_axis == -1 else "x_t"
    if not isinstance(weight, NMSparseWeight):
        raise TypeError(f"weight: expected an nmspmm.NMSparseWeight, got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != weight.dtype:
        raise TypeError(f"{name}: dtype {x.dtype} does not match weight dtype {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{name}: on {x.device}, but weight is on {weight.device}")
    if x.dim() == 0 or x.shape[feature_axis] != weight.shape[1]:
        axis = "last" if feature_axis == -1 else "first"
        raise ValueError(
            f"{name}: expected {axis} dimension K={weight.shape[1]} (in_features), got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(x.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias: dtype {bias.dtype} does not match weight dtype {weight.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"bias: on {bias.device}, but weight is on {weight.device}")
