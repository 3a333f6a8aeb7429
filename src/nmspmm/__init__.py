"""nmspmm: sparse matrix products for pruned neural networks, as Triton kernels in PyTorch."""

from .formats import NMSparseWeight

__all__ = ["NMSparseWeight"]
