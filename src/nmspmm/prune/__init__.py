"""Pruning: choose which weights a vector-wise N:M pattern keeps, and compress them."""

from .magnitude import magnitude_mask, prune

__all__ = ["magnitude_mask", "prune"]
