"""Sparse weight layouts: compress from dense + mask, back to dense, validate, move and save."""

from .nm import NMSparseWeight
from .pattern import SUPPORTED_DTYPES, SUPPORTED_M, SUPPORTED_VECTORS, parse_pattern

__all__ = ["NMSparseWeight", "parse_pattern", "SUPPORTED_DTYPES", "SUPPORTED_M", "SUPPORTED_VECTORS"]
