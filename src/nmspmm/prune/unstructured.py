"""Unstructured magnitude pruning: keep the largest |w| over the whole matrix, in any positions, and compress
into a :class:`CSRWeight` or a :class:`BitmapWeight` (both keep the same entries)."""

from __future__ import annotations

import math

import torch

from ..formats.base import register_pruner
from ..formats.bitmap import BitmapWeight
from ..formats.csr import CSRWeight
from ..formats.pattern import check_weight_matrix, holds_values
from .magnitude import check_finite, largest_mask


def check_sparsity(sparsity: float) -> float:
    """Validate a sparsity (the fraction of weights to prune): a real number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity: expected a float in [0, 1), got {type(sparsity).__name__} {sparsity!r}")
    if not (math.isfinite(sparsity) and 0 <= sparsity < 1):
        raise ValueError(f"sparsity: expected a float in [0, 1), got {sparsity}")
    return float(sparsity)


def check_unstructured_prunable(weight: torch.Tensor, sparsity: float) -> float:
    """Validate a weight to prune without structure (type, dtype, a non-empty 2-D shape, finite values) and
    ``sparsity``; return the sparsity as a float. Shared by every unstructured rule."""
    sparsity = check_sparsity(sparsity)
    check_weight_matrix(weight, 1, 1, 1)  # 1:1 with V = 1 constrains nothing: type, dtype, a non-empty 2-D shape
    check_finite(weight)
    return sparsity


def unstructured_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """bool ``[N, K]`` mask keeping the ``round((1 - sparsity) * N * K)`` entries of largest |w| over the whole
    matrix; ties go to the earlier entry in row-major order, so the mask is deterministic."""
    sparsity = check_unstructured_prunable(weight, sparsity)
    return largest_mask(weight.detach().abs(), kept_entry_count(weight, sparsity))


def kept_entry_count(weight: torch.Tensor, sparsity: float) -> int:
    """How many entries of ``weight`` pruning to ``sparsity`` keeps: ``round((1 - sparsity) * N * K)``."""
    return round((1 - sparsity) * weight.numel())


def prune_csr(weight: torch.Tensor, sparsity: float) -> CSRWeight:
    """Magnitude-prune ``weight`` [N, K] to ``sparsity`` (:func:`unstructured_mask`: the ``round((1 - sparsity) *
    N * K)`` largest |w| over the whole matrix are kept) into a :class:`CSRWeight` holding a detached copy of the
    kept values. A weight without values (on the meta device or fake: :func:`holds_values`), where no entries can
    be ranked, gives a shape-only weight of as many entries in the placeholder structure, the first ones in
    row-major order (:meth:`CSRWeight.placeholder_indices`)."""
    return _prune_unstructured(CSRWeight, weight, sparsity)


def prune_bitmap(weight: torch.Tensor, sparsity: float) -> BitmapWeight:
    """Magnitude-prune ``weight`` [N, K] to ``sparsity`` into a :class:`BitmapWeight` holding a detached copy of
    the kept values: the entries :func:`prune_csr` keeps (:func:`unstructured_mask`). A weight without values (on
    the meta device or fake: :func:`holds_values`) gives a shape-only weight of as many entries in the placeholder
    structure, the first ones in row-major order (:meth:`BitmapWeight.placeholder_indices`)."""
    return _prune_unstructured(BitmapWeight, weight, sparsity)


def _prune_unstructured(
    format_type: type[CSRWeight] | type[BitmapWeight], weight: torch.Tensor, sparsity: float
) -> CSRWeight | BitmapWeight:
    """``format_type.from_dense`` of the detached ``weight`` under :func:`unstructured_mask`, or its placeholder of
    as many entries where ``weight`` holds no values."""
    mask = unstructured_mask(weight, sparsity)
    if not holds_values(weight):
        values = weight.new_empty(kept_entry_count(weight, sparsity))
        return format_type.placeholder(values, {"shape": list(weight.shape)})
    return format_type.from_dense(weight.detach(), mask)


register_pruner(CSRWeight, "prune_csr", prune_csr)
register_pruner(BitmapWeight, "prune_bitmap", prune_bitmap)
