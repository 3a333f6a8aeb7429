"""Magnitude pruning to vector-wise N:M: in every V-group of output features and every run of m input
features, keep the n inputs with the largest summed |w| over the V rows."""

from __future__ import annotations

import torch

from ..formats.nm import NMSparseWeight
from ..formats.pattern import check_vector, check_weight_matrix, holds_values, parse_pattern


def check_prunable(weight: torch.Tensor, pattern: str, vector: int) -> tuple[int, int]:
    """Validate a weight to prune (type, shape against pattern and vector, finite values) and return ``(n, m)``;
    shared by every pruning rule so that they refuse the same inputs with the same messages."""
    n, m = parse_pattern(pattern)
    check_vector(vector)
    check_weight_matrix(weight, n, m, vector)
    check_finite(weight)
    return n, m


def check_finite(weight: torch.Tensor) -> None:
    """Refuse a weight with a NaN or infinite entry, naming the first one: no pruning rule can rank those. A weight
    without values (on the meta device or fake: :func:`holds_values`) has none to check."""
    if not holds_values(weight):
        return
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        row, col = (~finite).nonzero()[0].tolist()
        raise ValueError(f"weight: expected finite values, got {weight[row, col].item()} at row {row}, column {col}")


def largest_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """bool mask of the ``keep`` largest entries of ``scores`` (any shape), ties to the lower row-major index, so
    that the mask is deterministic."""
    flat = scores.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.view(scores.shape)


def check_scores(scores: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    """Check that ``scores`` is a float tensor of ``shape`` holding finite, non-negative values (where it holds
    values: :func:`holds_values`), as the pruning rules that rank by a score (Wanda's input norms, permutation
    search scores) require."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point dtype, got {scores.dtype}")
    if scores.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(scores.shape)}")
    if not holds_values(scores):
        return
    bad = ~torch.isfinite(scores) | (scores < 0)
    if bool(bad.any()):
        index = tuple(bad.nonzero()[0].tolist())
        where = index[0] if len(index) == 1 else index
        raise ValueError(f"{name}: expected finite, non-negative values, got {scores[index].item()} at index {where}")


def vector_sums(scores: torch.Tensor, vector: int) -> torch.Tensor:
    """Sum ``[N, K]`` scores over each V-group of rows in float64 (exact for float16 inputs): ``[N // V, K]``."""
    rows, cols = scores.shape
    return scores.detach().to(torch.float64).reshape(rows // vector, vector, cols).sum(1)


def topn_group_mask(group_scores: torch.Tensor, n: int, m: int, vector: int) -> torch.Tensor:
    """bool ``[G * V, K]`` mask from V-group scores ``[G, K]``: in each group of m columns keep the n with the
    largest score, ties to the lower index, and repeat each V-group's choice over its V rows."""
    groups, cols = group_scores.shape
    runs = group_scores.reshape(groups, cols // m, m)
    order = torch.sort(runs, dim=-1, descending=True, stable=True).indices
    run_mask = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return run_mask.view(groups, cols).repeat_interleave(vector, 0)


def magnitude_mask(weight: torch.Tensor, pattern: str, vector: int = 1) -> torch.Tensor:
    """bool ``[N, K]`` mask keeping, per V-group and group of m inputs, the n inputs with the largest summed |w|;
    sums are taken in float64, not the weight's precision (exact for float16), and ties go to the lower index."""
    n, m = check_prunable(weight, pattern, vector)
    return topn_group_mask(vector_sums(weight.detach().abs(), vector), n, m, vector)


def prune(weight: torch.Tensor, pattern: str, vector: int = 1) -> NMSparseWeight:
    """Magnitude-prune ``weight`` to the vector-wise ``pattern`` (see :func:`magnitude_mask`) and compress it;
    the result holds a detached copy of the kept values. A weight without values (on the meta device or fake)
    gives a shape-only weight of the placeholder structure, the first n of every m
    (:meth:`NMSparseWeight.from_dense`)."""
    mask = magnitude_mask(weight, pattern, vector)
    return NMSparseWeight.from_dense(weight.detach(), mask, pattern, vector)
