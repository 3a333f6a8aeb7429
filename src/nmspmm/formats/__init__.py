"""Sparse weight layouts: compress from dense + mask, back to dense, validate, move and save."""

from .nm import NMSparseWeight
from .pattern import SUPPORTED_DTYPES, SUPPORTED_M, SUPPORTED_VECTORS, parse_pattern
from .serialization import load_safetensors, save_safetensors

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_M",
    "SUPPORTED_VECTORS",
    "NMSparseWeight",
    "load_safetensors",
    "parse_pattern",
    "save_safetensors",
]
