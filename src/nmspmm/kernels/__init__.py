"""Triton kernels and their launchers; they take plain tensors and know nothing of formats or modules."""

from .nm_backward import BackwardConfig, default_backward_config, nm_grad_input, nm_grad_values
from .nm_element import nm_element_matmul
from .nm_vector import VectorConfig, interpreter_config, nm_vector_matmul
from .transpose import transpose

__all__ = [
    "BackwardConfig",
    "VectorConfig",
    "default_backward_config",
    "interpreter_config",
    "nm_element_matmul",
    "nm_grad_input",
    "nm_grad_values",
    "nm_vector_matmul",
    "transpose",
]
