"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"):
one-shot pruning that keeps a layer's outputs on calibration inputs. Given the Gram matrix ``H = X^T X`` of the
layer's inputs, it walks the input features left to right in blocks, with the upper Cholesky factor of the damped
``H^-1``: it chooses the mask of each run of columns by the saliency ``w^2 / [H^-1]_jj^2``, zeroes what the mask
prunes, and spreads each pruned weight's error over the later columns (the optimal brain surgeon update), so that
the kept weights change to make up for the pruned ones. Vector-wise N:M chooses each run of m inputs by the
saliency summed over the V rows of a group, which then share it; every row gets its own update."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..formats.csr import CSRWeight
from ..formats.nm import NMSparseWeight
from ..formats.pattern import check_weight_matrix
from .magnitude import check_finite, check_prunable, largest_mask, topn_group_mask, vector_sums
from .unstructured import check_sparsity

# Damping added to H's diagonal, as a fraction of its mean (the reference procedure's default), and the columns
# processed per block.
DAMPING = 0.01
BLOCK = 128


def check_gram(gram: torch.Tensor, features: int) -> None:
    """Refuse a ``gram`` that is not a finite floating-point ``[features, features]`` tensor (the Gram matrix
    ``X^T X`` of a layer's inputs over calibration tokens)."""
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"gram: expected a torch.Tensor, got {type(gram).__name__}")
    if not gram.is_floating_point():
        raise TypeError(f"gram: expected a floating-point dtype, got {gram.dtype}")
    if gram.shape != (features, features):
        raise ValueError(f"gram: expected shape ({features}, {features}) (the weight's in_features), got "
                         f"{tuple(gram.shape)}")
    if not bool(torch.isfinite(gram).all()):
        raise ValueError("gram: expected finite values, found NaN or Inf")


def _check_settings(damping: float, block: int, multiple: int) -> None:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping < 1:
        raise ValueError(f"damping: expected a number in (0, 1), got {damping!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0 or block % multiple:
        raise ValueError(f"block: expected a positive multiple of {multiple}, got {block!r}")


def reconstruct(
    weight: torch.Tensor,
    gram: torch.Tensor,
    choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    run: int,
    damping: float = DAMPING,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SparseGPT pass over ``weight`` [N, K] with inputs' Gram matrix ``gram`` [K, K]: returns the updated
    weight (zeros where pruned, in float64 on the CPU and float32 on a GPU) and the bool keep-mask. At the start
    of every ``run`` columns (within a block), ``choose(w, d)`` picks the keep-mask of those columns from their
    current weights ``w`` [N, run] and the diagonal ``d`` [run] of the Cholesky factor of ``H^-1``. Inputs that
    no calibration token reached (a zero diagonal of ``gram``) get zero weights."""
    compute = torch.float64 if weight.device.type == "cpu" else torch.float32
    w_all = weight.detach().to(compute).clone()
    h = gram.detach().to(device=weight.device, dtype=compute).clone()
    rows, cols = w_all.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w_all[:, dead] = 0.0
    h.diagonal().add_(damping * torch.diagonal(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w_block = w_all[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        diagonal = torch.diagonal(hinv_block)
        for i in range(end - start):
            if i % run == 0:
                width = min(run, end - start - i)
                keep[:, start + i:start + i + width] = choose(w_block[:, i:i + width], diagonal[i:i + width])
            column = w_block[:, i]
            kept = torch.where(keep[:, start + i], column, 0.0)
            error = (column - kept) / diagonal[i]
            w_block[:, i:] -= error[:, None] * hinv_block[i, i:][None, :]
            w_block[:, i] = kept
            errors[:, i] = error
        w_all[:, start:end] = w_block
        w_all[:, end:] -= errors @ hinv[start:end, end:]
    return w_all, keep


def sparsegpt(
    weight: torch.Tensor, gram: torch.Tensor, pattern: str, vector: int = 1, *, damping: float = DAMPING,
    block: int = BLOCK,
) -> NMSparseWeight:
    """Prune ``weight`` [N, K] to the vector-wise N:M ``pattern`` by SparseGPT (module docstring), given the Gram
    matrix ``gram`` = ``X^T X`` [K, K] of its inputs ``X`` over calibration tokens: each run of m inputs keeps,
    per V-group, the n of largest summed saliency, and the kept weights are updated to keep ``X @ W.T``. Returns the
    compressed weight in ``weight``'s dtype. ``damping`` (a fraction of H's mean diagonal) and ``block`` (columns
    per block, a multiple of m) are the reference procedure's settings."""
    n, m = check_prunable(weight, pattern, vector)
    check_gram(gram, weight.shape[1])
    _check_settings(damping, block, m)

    def choose(w: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
        return topn_group_mask(vector_sums(w.square() / diagonal.square(), vector), n, m, vector)

    updated, keep = reconstruct(weight, gram, choose, m, damping, block)
    return NMSparseWeight.from_dense(updated.to(weight.dtype), keep, pattern, vector)


def sparsegpt_csr(
    weight: torch.Tensor, gram: torch.Tensor, sparsity: float, *, damping: float = DAMPING, block: int = BLOCK
) -> CSRWeight:
    """Prune ``weight`` [N, K] to unstructured ``sparsity`` by SparseGPT, given the Gram matrix ``gram`` of its
    inputs (see :func:`sparsegpt`): each block of columns keeps the ``round((1 - sparsity) * N * width)`` entries of
    largest saliency, so the whole keeps about ``(1 - sparsity) * N * K``. Returns a :class:`CSRWeight` in
    ``weight``'s dtype."""
    sparsity = check_sparsity(sparsity)
    check_weight_matrix(weight, 1, 1, 1)  # 1:1 with V = 1 constrains nothing: type, dtype, a non-empty 2-D shape
    check_finite(weight)
    check_gram(gram, weight.shape[1])
    _check_settings(damping, block, 1)

    def choose(w: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
        return largest_mask(w.square() / diagonal.square(), round((1 - sparsity) * w.numel()))

    updated, keep = reconstruct(weight, gram, choose, block, damping, block)
    return CSRWeight.from_dense(updated.to(weight.dtype), keep)
