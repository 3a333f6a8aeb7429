"""nmspmm: sparse matrix products for pruned neural networks, as Triton kernels in PyTorch."""

from .formats import NMSparseWeight, load_safetensors, save_safetensors
from .nn import SparseLinear, SparsifyReport, sparsify
from .ops import linear, linear_feature_major
from .prune import magnitude_mask, prune

__all__ = [
    "NMSparseWeight",
    "SparseLinear",
    "SparsifyReport",
    "linear",
    "linear_feature_major",
    "load_safetensors",
    "magnitude_mask",
    "prune",
    "save_safetensors",
    "sparsify",
]
