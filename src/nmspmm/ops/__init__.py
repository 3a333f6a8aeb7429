"""Torch-facing sparse products, one module per weight format; each checks its arguments and runs the Triton
kernels (CUDA, or the CPU interpreter when asked) or the dense reference (CPU)."""

from .backend import BACKENDS, check_backend
from .nm import check_bias, linear, linear_feature_major, nm_linear, nm_linear_feature_major

__all__ = ["BACKENDS", "check_backend", "check_bias", "linear", "linear_feature_major", "nm_linear", "nm_linear_feature_major"]
