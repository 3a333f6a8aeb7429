"""Triton kernels and their launchers; they take plain tensors and know nothing of formats or modules."""

from .bandwidth import L2_PROBE_BLOCK, l2_read, touch
from .block_sparse import BlockSparseConfig, block_sparse_matmul, choose_block_sparse_config
from .csr_spmm import SpmmBlocks, csr_spmm, spmm_blocks
from .nm_backward import BackwardConfig, default_backward_config, nm_grad_input, nm_grad_values
from .nm_element import choose_element_config, nm_element_matmul
from .nm_vector import VectorConfig, choose_vector_config, interpreter_config, nm_vector_matmul
from .sddmm import SddmmBlocks, sddmm, sddmm_blocks
from .transpose import transpose

__all__ = [
    "L2_PROBE_BLOCK",
    "BlockSparseConfig",
    "SddmmBlocks",
    "SpmmBlocks",
    "block_sparse_matmul",
    "choose_block_sparse_config",
    "choose_element_config",
    "choose_vector_config",
    "csr_spmm",
    "sddmm",
    "sddmm_blocks",
    "spmm_blocks",
    "BackwardConfig",
    "VectorConfig",
    "default_backward_config",
    "interpreter_config",
    "l2_read",
    "nm_element_matmul",
    "nm_grad_input",
    "nm_grad_values",
    "nm_vector_matmul",
    "touch",
    "transpose",
]
