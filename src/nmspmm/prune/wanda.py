"""Activation-aware pruning (Wanda: Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
Models"): weight w_ij scores |w_ij| * ||x_j||_2, where ||x_j||_2 is the L2 norm of input feature j over
calibration tokens (:func:`~nmspmm.prune.collect_input_norms`), so inputs that carry large activations keep
more weights. N:M compares within each V-group and run of m inputs, unstructured within each output row (as
Wanda does), blocks by the scores summed over each tile (:func:`~nmspmm.prune.prune_block_shuffled`'s
``scores``)."""

from __future__ import annotations

import torch

from .magnitude import check_prunable, check_scores, topn_group_mask, vector_sums
from .unstructured import check_unstructured_prunable


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """float64 ``[N, K]`` scores ``|w_ij| * ||x_j||`` of ``weight`` given the ``[K]`` ``input_norm``."""
    check_scores(input_norm, "input_norm", (weight.shape[1],))
    norm = input_norm.detach().to(device=weight.device, dtype=torch.float64)
    return weight.detach().abs().to(torch.float64) * norm


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, pattern: str, vector: int = 1) -> torch.Tensor:
    """bool ``[N, K]`` mask keeping, per V-group and group of m inputs, the n inputs with the largest
    ``||x_j|| * sum |w_ij|`` over the V rows; float64 scores and ties to the lower index, as in magnitude pruning."""
    n, m = check_prunable(weight, pattern, vector)
    return topn_group_mask(vector_sums(wanda_scores(weight, input_norm), vector), n, m, vector)


def wanda_csr_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """bool ``[N, K]`` unstructured mask keeping, in every row, the ``round((1 - sparsity) * K)`` entries of largest
    ``|w_ij| * ||x_j||`` (ties to the lower index): Wanda compares weights of the same output."""
    sparsity = check_unstructured_prunable(weight, sparsity)
    scores = wanda_scores(weight, input_norm)
    keep = round((1 - sparsity) * weight.shape[1])
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order[:, :keep], True)
