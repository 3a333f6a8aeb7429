"""Pruning: choose which weights a vector-wise N:M pattern keeps (by magnitude, or by Wanda's activation-aware
score, optionally after an input-channel permutation), unstructured magnitude masks, and block masks after a
searched row permutation; and compress them."""

from .block_shuffle import prune_block_shuffled, search_row_permutation
from .magnitude import magnitude_mask, prune
from .permutation import kept_magnitude, search_permutation
from .unstructured import unstructured_mask
from .wanda import collect_input_norms, wanda_mask

__all__ = [
    "collect_input_norms",
    "kept_magnitude",
    "magnitude_mask",
    "prune",
    "prune_block_shuffled",
    "search_permutation",
    "search_row_permutation",
    "unstructured_mask",
    "wanda_mask",
]
