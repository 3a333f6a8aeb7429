"""Torch-facing sparse products, one module per weight format (nm, csr, block_shuffled), each with its argument
checks and torch.library custom ops; ``linear`` dispatches on the weight's format, and ``backend`` chooses the
Triton kernels (CUDA, or the CPU interpreter when asked) or the dense reference (CPU)."""

from .backend import BACKENDS, call_op, check_backend, check_bias
from .block_shuffled import block_shuffled_linear, block_shuffled_linear_op
from .csr import csr_linear, csr_linear_feature_major, csr_linear_feature_major_op, csr_linear_op, sddmm
from .dispatch import linear, linear_feature_major
from .nm import nm_linear, nm_linear_feature_major

__all__ = [
    "BACKENDS",
    "block_shuffled_linear",
    "block_shuffled_linear_op",
    "call_op",
    "check_backend",
    "check_bias",
    "csr_linear",
    "csr_linear_feature_major",
    "csr_linear_feature_major_op",
    "csr_linear_op",
    "linear",
    "linear_feature_major",
    "nm_linear",
    "nm_linear_feature_major",
    "sddmm",
]
