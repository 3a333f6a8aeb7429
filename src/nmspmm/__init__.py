"""nmspmm: sparse matrix products for pruned neural networks, as Triton kernels in PyTorch."""

from ._version import __version__
from .formats import (
    BitmapWeight, BlockShuffledWeight, CSRWeight, NMSparseWeight, QuantizedNMWeight, load_safetensors, save_safetensors,
)
from .nn import (
    BitmapConfig, BitmapLinear, BlockConfig, BlockShuffledLinear, CSRConfig, CSRLinear, NMConfig, QuantizedSparseLinear,
    SparseLinear, SparsifyConfig, SparsifyReport, sparsify,
)
from .ops import linear, linear_feature_major, sddmm
from .pretrained import densify, load_pretrained, save_pretrained
from .prune import magnitude_mask, unstructured_mask

# The pruning package itself, callable as its N:M entry point (nmspmm.prune(weight, "8:32", vector=64)), so that
# nmspmm.prune.wanda_mask and the other pruning functions are reached under the same name.
from . import prune

__all__ = [
    "BitmapConfig",
    "BitmapLinear",
    "BitmapWeight",
    "BlockConfig",
    "BlockShuffledLinear",
    "BlockShuffledWeight",
    "CSRConfig",
    "CSRLinear",
    "CSRWeight",
    "NMConfig",
    "NMSparseWeight",
    "QuantizedNMWeight",
    "QuantizedSparseLinear",
    "SparseLinear",
    "SparsifyConfig",
    "SparsifyReport",
    "__version__",
    "densify",
    "linear",
    "linear_feature_major",
    "load_pretrained",
    "load_safetensors",
    "magnitude_mask",
    "prune",
    "save_pretrained",
    "save_safetensors",
    "sddmm",
    "sparsify",
    "unstructured_mask",
]
