"""Pruning: choose which weights a vector-wise N:M pattern keeps (by magnitude, or by Wanda's activation-aware
score, optionally after an input-channel permutation), and compress them."""

from .magnitude import magnitude_mask, prune
from .permutation import kept_magnitude, search_permutation
from .wanda import collect_input_norms, wanda_mask

__all__ = ["collect_input_norms", "kept_magnitude", "magnitude_mask", "prune", "search_permutation", "wanda_mask"]
