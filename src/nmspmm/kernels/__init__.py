"""Triton kernels and their launchers; they take plain tensors and know nothing of formats or modules."""

from .nm_element import nm_element_matmul
from .nm_vector import VectorConfig, interpreter_config, nm_vector_matmul
from .transpose import transpose

__all__ = ["nm_element_matmul", "nm_vector_matmul", "VectorConfig", "interpreter_config", "transpose"]
