"""Pruning: choose which weights a vector-wise N:M pattern keeps (by magnitude, or by Wanda's activation-aware
score, optionally after an input-channel permutation), unstructured masks, and block masks after a searched row
permutation; and compress them: :func:`prune` (N:M), :func:`prune_csr`, :func:`prune_bitmap` (the entries
:func:`prune_csr` keeps, as a bitmap), :func:`prune_block_shuffled`. SparseGPT
(:func:`sparsegpt` for N:M, :func:`sparsegpt_csr` unstructured, :func:`sparsegpt_block_shuffled`) also updates
the kept weights to keep the layer's outputs on calibration inputs; :func:`prune_sequentially` runs it through a
model layer by layer.

The package is callable: ``nmspmm.prune(weight, "8:32", vector=64)`` is :func:`prune`, so that the documented
call and the package's functions (``nmspmm.prune.wanda_mask``, ...) share the name ``nmspmm.prune``."""

import sys
import types

import torch

from ..formats import NMSparseWeight

from .block_shuffle import prune_block_shuffled, search_row_permutation
from .calibration import collect_input_grams, collect_input_norms, prune_sequentially
from .magnitude import magnitude_mask, prune
from .permutation import kept_magnitude, search_permutation
from .sparsegpt import sparsegpt, sparsegpt_block_shuffled, sparsegpt_csr
from .unstructured import prune_bitmap, prune_csr, unstructured_mask
from .wanda import wanda_csr_mask, wanda_mask, wanda_scores

__all__ = [
    "collect_input_grams",
    "collect_input_norms",
    "kept_magnitude",
    "magnitude_mask",
    "prune",
    "prune_bitmap",
    "prune_block_shuffled",
    "prune_csr",
    "prune_sequentially",
    "search_permutation",
    "search_row_permutation",
    "sparsegpt",
    "sparsegpt_block_shuffled",
    "sparsegpt_csr",
    "unstructured_mask",
    "wanda_csr_mask",
    "wanda_mask",
    "wanda_scores",
]


class _CallablePackage(types.ModuleType):
    """The pruning package, which calls :func:`prune` when called."""

    def __call__(self, weight: torch.Tensor, pattern: str, vector: int = 1) -> NMSparseWeight:
        """:func:`prune`: magnitude-prune ``weight`` to the vector-wise ``pattern`` and compress it."""
        return prune(weight, pattern, vector)


sys.modules[__name__].__class__ = _CallablePackage
