"""Magnitude pruning to vector-wise N:M: in every V-group of output features and every run of m input
features, keep the n inputs with the largest summed |w| over the V rows."""

from __future__ import annotations

import torch

from ..formats.nm import NMSparseWeight
from ..formats.pattern import check_vector, check_weight_matrix, parse_pattern


def magnitude_mask(weight: torch.Tensor, pattern: str, vector: int = 1) -> torch.Tensor:
    """bool ``[N, K]`` mask keeping, per V-group and group of m inputs, the n inputs with the largest summed |w|;
    sums are taken in float64, not the weight's precision (exact for float16), and ties go to the lower index."""
    n, m = parse_pattern(pattern)
    check_vector(vector)
    check_weight_matrix(weight, n, m, vector)
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        row, col = (~finite).nonzero()[0].tolist()
        raise ValueError(f"weight: expected finite values, got {weight[row, col].item()} at row {row}, column {col}")
    rows, cols = weight.shape
    scores = weight.detach().abs().to(torch.float64).reshape(rows // vector, vector, cols // m, m).sum(1)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    group_mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return group_mask.repeat_interleave(vector, 0).view(rows, cols)


def prune(weight: torch.Tensor, pattern: str, vector: int = 1) -> NMSparseWeight:
    """Magnitude-prune ``weight`` to the vector-wise ``pattern`` (see :func:`magnitude_mask`) and compress it;
    the result holds a detached copy of the kept values."""
    mask = magnitude_mask(weight, pattern, vector)
    return NMSparseWeight.from_dense(weight.detach(), mask, pattern, vector)
