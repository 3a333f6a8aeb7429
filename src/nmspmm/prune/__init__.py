"""Pruning: choose which weights a vector-wise N:M pattern keeps (by magnitude, or by Wanda's activation-aware
score, optionally after an input-channel permutation), unstructured magnitude masks, and block masks after a
searched row permutation; and compress them: :func:`prune` (N:M), :func:`prune_csr`, :func:`prune_block_shuffled`.
SparseGPT (:func:`sparsegpt` for N:M, :func:`sparsegpt_csr` unstructured) also updates the kept weights to keep
the layer's outputs on calibration inputs.

The package is callable: ``nmspmm.prune(weight, "8:32", vector=64)`` is :func:`prune`, so that the documented
call and the package's functions (``nmspmm.prune.wanda_mask``, ...) share the name ``nmspmm.prune``."""

import sys
import types

import torch

from ..formats import NMSparseWeight

from .block_shuffle import prune_block_shuffled, search_row_permutation
from .magnitude import magnitude_mask, prune
from .permutation import kept_magnitude, search_permutation
from .sparsegpt import sparsegpt, sparsegpt_csr
from .unstructured import prune_csr, unstructured_mask
from .wanda import collect_input_norms, wanda_mask

__all__ = [
    "collect_input_norms",
    "kept_magnitude",
    "magnitude_mask",
    "prune",
    "prune_block_shuffled",
    "prune_csr",
    "search_permutation",
    "search_row_permutation",
    "sparsegpt",
    "sparsegpt_csr",
    "unstructured_mask",
    "wanda_mask",
]


class _CallablePackage(types.ModuleType):
    """The pruning package, which calls :func:`prune` when called."""

    def __call__(self, weight: torch.Tensor, pattern: str, vector: int = 1) -> NMSparseWeight:
        """:func:`prune`: magnitude-prune ``weight`` to the vector-wise ``pattern`` and compress it."""
        return prune(weight, pattern, vector)


sys.modules[__name__].__class__ = _CallablePackage
