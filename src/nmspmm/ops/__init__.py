"""Torch-facing sparse products, one module per weight format (nm, csr, bitmap, block_shuffled), each in one shape:
the checked public functions (``nm_linear``, ``csr_linear``, ``bitmap_linear``, ``block_shuffled_linear``, ...),
and their torch.library custom ops (``*_op``, defined with their fakes and autograd by ``backend.define_op``), which
torch.compile traces while eager calls run the implementation directly. ``linear`` dispatches on the weight's format,
and ``backend`` chooses the Triton kernels (CUDA, or the CPU interpreter when asked) or the dense reference (CPU)."""

from .backend import BACKENDS, Op, call_op, check_backend, check_bias, define_op
from .bitmap import bitmap_linear, bitmap_linear_feature_major, bitmap_linear_feature_major_op, bitmap_linear_op
from .block_shuffled import block_shuffled_linear, block_shuffled_linear_op
from .csr import csr_linear, csr_linear_feature_major, csr_linear_feature_major_op, csr_linear_op, sddmm
from .dispatch import linear, linear_feature_major
from .nm import (
    nm_linear, nm_linear_feature_major, nm_linear_feature_major_op, nm_linear_op, nm_quantized_linear,
    nm_quantized_linear_op,
)

__all__ = [
    "BACKENDS",
    "Op",
    "bitmap_linear",
    "bitmap_linear_feature_major",
    "bitmap_linear_feature_major_op",
    "bitmap_linear_op",
    "block_shuffled_linear",
    "block_shuffled_linear_op",
    "call_op",
    "check_backend",
    "check_bias",
    "csr_linear",
    "csr_linear_feature_major",
    "csr_linear_feature_major_op",
    "csr_linear_op",
    "define_op",
    "linear",
    "linear_feature_major",
    "nm_linear",
    "nm_linear_feature_major",
    "nm_linear_feature_major_op",
    "nm_linear_op",
    "nm_quantized_linear",
    "nm_quantized_linear_op",
    "sddmm",
]
