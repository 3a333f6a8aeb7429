"""nmspmm: sparse matrix products for pruned neural networks, as Triton kernels in PyTorch."""

from .formats import BlockShuffledWeight, CSRWeight, NMSparseWeight, load_safetensors, save_safetensors
from .nn import BlockShuffledLinear, CSRLinear, SparseLinear, SparsifyReport, sparsify
from .ops import linear, linear_feature_major, sddmm
from .prune import magnitude_mask, prune, unstructured_mask

__all__ = [
    "BlockShuffledLinear",
    "BlockShuffledWeight",
    "CSRLinear",
    "CSRWeight",
    "NMSparseWeight",
    "SparseLinear",
    "SparsifyReport",
    "linear",
    "linear_feature_major",
    "load_safetensors",
    "magnitude_mask",
    "prune",
    "save_safetensors",
    "sddmm",
    "sparsify",
    "unstructured_mask",
]
