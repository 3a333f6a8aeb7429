"""Sparse weight layouts: compress from dense + mask, back to dense, validate, move and save. Vector-wise N:M
(NMSparseWeight, and QuantizedNMWeight with 8-bit values), unstructured CSR (CSRWeight), unstructured as a bitmap
with block offsets for tensor-core kernels (BitmapWeight) and block-sparse after a row permutation
(BlockShuffledWeight)."""

from .bitmap import BitmapWeight
from .block_shuffled import SUPPORTED_BLOCK_SIDES, BlockShuffledWeight
from .csr import CSRWeight
from .nm import NMSparseWeight
from .quantized import QUANTIZED_DTYPES, QuantizedNMWeight
from .pattern import SUPPORTED_DTYPES, SUPPORTED_M, SUPPORTED_VECTORS, parse_pattern
from .serialization import SparseWeight, load_safetensors, save_safetensors

__all__ = [
    "QUANTIZED_DTYPES",
    "SUPPORTED_BLOCK_SIDES",
    "SUPPORTED_DTYPES",
    "SUPPORTED_M",
    "SUPPORTED_VECTORS",
    "BitmapWeight",
    "BlockShuffledWeight",
    "CSRWeight",
    "NMSparseWeight",
    "QuantizedNMWeight",
    "SparseWeight",
    "load_safetensors",
    "parse_pattern",
    "save_safetensors",
]
