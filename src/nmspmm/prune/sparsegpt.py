"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"):
one-shot pruning that keeps a layer's outputs on calibration inputs. Given the Gram matrix ``H = X^T X`` of the
layer's inputs, it walks the input features left to right in blocks, with the upper Cholesky factor of the damped
``H^-1``: it chooses the mask of each run of columns by the saliency ``w^2 / [H^-1]_jj^2``, zeroes what the mask
prunes, and spreads each pruned weight's error over the later columns (the optimal brain surgeon update), so that
the kept weights change to make up for the pruned ones. Vector-wise N:M chooses each run of m inputs by the
saliency summed over the V rows of a group, which then share it; every row gets its own update. Blocks choose
whole tiles of a row-permuted weight by their summed saliency."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..formats.block_shuffled import INDEX_DTYPE, BlockShuffledWeight
from ..formats.csr import CSRWeight
from ..formats.nm import NMSparseWeight
from .block_shuffle import check_block_prunable, kept_block_count, search_row_permutation, tile_magnitudes
from .magnitude import check_prunable, largest_mask, topn_group_mask, vector_sums
from .unstructured import check_unstructured_prunable
from .wanda import wanda_scores

# Damping added to H's diagonal, as a fraction of its mean (the reference procedure's default), and about how many
# columns are processed per step (rounded up to a multiple of the pattern's run of columns).
DAMPING = 0.01
COLUMNS = 128


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


def step_columns(damping: float, columns: int | None, run: int) -> int:
    """Check ``damping`` and ``columns`` (the settings of every SparseGPT function; ``run`` is the pattern's run
    of columns: m, a block's width, or 1); return the columns per step: ``columns``, or the multiple of ``run``
    nearest above :data:`COLUMNS` when None."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping < 1:
        raise ValueError(f"damping: expected a number in (0, 1), got {damping!r}")
    if columns is None:
        return -(-COLUMNS // run) * run
    if isinstance(columns, bool) or not isinstance(columns, int) or columns <= 0 or columns % run:
        raise ValueError(f"columns: expected a positive multiple of {run}, got {columns!r}")
    return columns


def reconstruct(
    weight: torch.Tensor,
    gram: torch.Tensor,
    choose: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    run: int,
    damping: float,
    columns: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SparseGPT pass over ``weight`` [N, K] with inputs' Gram matrix ``gram`` [K, K]: returns the updated
    weight (zeros where pruned, in float64 on the CPU and float32 on a GPU) and the bool keep-mask. At the start
    of every ``run`` input columns (within a step of ``columns``), ``choose(w, d, first)`` picks the keep-mask of
    the columns from ``first`` on from their current weights ``w`` [N, run] and the diagonal ``d`` [run] of the
    Cholesky factor of ``H^-1``. Inputs that no calibration token reached (a zero diagonal of ``gram``) get zero
    weights."""
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
    for start in range(0, cols, columns):
        end = min(start + columns, cols)
        w_block = w_all[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        diagonal = torch.diagonal(hinv_block)
        for i in range(end - start):
            if i % run == 0:
                width = min(run, end - start - i)
                keep[:, start + i:start + i + width] = choose(w_block[:, i:i + width], diagonal[i:i + width], start + i)
            column = w_block[:, i]
            kept = torch.where(keep[:, start + i], column, 0.0)
            error = (column - kept) / diagonal[i]
            w_block[:, i:] -= error[:, None] * hinv_block[i, i:][None, :]
            w_block[:, i] = kept
            errors[:, i] = error
        w_all[:, start:end] = w_block
        w_all[:, end:] -= errors @ hinv[start:end, end:]
    return w_all, keep


def saliency(w: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
    """SparseGPT's saliency of weights ``w`` [N, run] whose columns have the ``H^-1`` Cholesky diagonal
    ``diagonal``: the output error that pruning each alone adds, ``w^2 / d^2``."""
    return w.square() / diagonal.square()


def sparsegpt(
    weight: torch.Tensor, gram: torch.Tensor, pattern: str, vector: int = 1, *, damping: float = DAMPING,
    columns: int | None = None,
) -> NMSparseWeight:
    """Prune ``weight`` [N, K] to the vector-wise N:M ``pattern`` by SparseGPT (module docstring), given the Gram
    matrix ``gram`` = ``X^T X`` [K, K] of its inputs ``X`` over calibration tokens: each run of m inputs keeps,
    per V-group, the n of largest summed saliency, and the kept weights are updated to keep ``X @ W.T``. Returns the
    compressed weight in ``weight``'s dtype. ``damping`` (a fraction of H's mean diagonal) and ``columns`` (per
    step, a multiple of m; about 128 when None) are the reference procedure's settings."""
    n, m = check_prunable(weight, pattern, vector)
    check_gram(gram, weight.shape[1])
    step = step_columns(damping, columns, m)

    def choose(w: torch.Tensor, diagonal: torch.Tensor, first: int) -> torch.Tensor:
        return topn_group_mask(vector_sums(saliency(w, diagonal), vector), n, m, vector)

    updated, keep = reconstruct(weight, gram, choose, m, damping, step)
    return NMSparseWeight.from_dense(updated.to(weight.dtype), keep, pattern, vector)


def sparsegpt_csr(
    weight: torch.Tensor, gram: torch.Tensor, sparsity: float, *, damping: float = DAMPING, columns: int | None = None
) -> CSRWeight:
    """Prune ``weight`` [N, K] to unstructured ``sparsity`` by SparseGPT, given the Gram matrix ``gram`` of its
    inputs (see :func:`sparsegpt`): each step of ``columns`` keeps the ``round((1 - sparsity) * N * width)`` entries
    of largest saliency, so the whole keeps about ``(1 - sparsity) * N * K``. Returns a :class:`CSRWeight` in
    ``weight``'s dtype."""
    sparsity = check_unstructured_prunable(weight, sparsity)
    check_gram(gram, weight.shape[1])
    step = step_columns(damping, columns, 1)

    def choose(w: torch.Tensor, diagonal: torch.Tensor, first: int) -> torch.Tensor:
        return largest_mask(saliency(w, diagonal), round((1 - sparsity) * w.numel()))

    updated, keep = reconstruct(weight, gram, choose, step, damping, step)
    return CSRWeight.from_dense(updated.to(weight.dtype), keep)


def sparsegpt_block_shuffled(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    block: tuple[int, int] = (32, 32),
    *,
    search: bool = True,
    damping: float = DAMPING,
    columns: int | None = None,
) -> BlockShuffledWeight:
    """Prune ``weight`` [N, K] to whole ``block`` tiles at ``sparsity`` after a row permutation, by SparseGPT
    given the Gram matrix ``gram`` of its inputs (see :func:`sparsegpt`). The permutation is searched (when
    ``search``) on Wanda's scores with the input norms ``sqrt(diag(gram))``, and each block-column of the
    permuted weight keeps as many tiles as Wanda's choice of the ``round((1 - sparsity) * total)`` tiles gives it;
    which ones is SparseGPT's choice as it reaches the column (those of largest summed saliency), and the kept
    weights are updated (rows are independent, so permuting them changes nothing in the update). Returns a
    :class:`BlockShuffledWeight` in ``weight``'s dtype."""
    bn, bk = check_block_prunable(weight, block, sparsity)
    if not isinstance(search, bool):
        raise TypeError(f"search: expected a bool, got {type(search).__name__} {search!r}")
    check_gram(gram, weight.shape[1])
    step = step_columns(damping, columns, bk)
    rows, cols = weight.shape
    scores = wanda_scores(weight, gram.diagonal().clamp_min(0).sqrt().to(torch.float32))
    permutation = torch.arange(rows, device=weight.device)
    if search:
        permutation = search_row_permutation(weight, (bn, bk), sparsity, scores=scores)
    wanda_tiles = largest_mask(tile_magnitudes(scores, (bn, bk), permutation), kept_block_count(rows // bn, cols // bk,
                                                                                                  sparsity))
    column_tiles = wanda_tiles.sum(0).tolist()

    def choose(w: torch.Tensor, diagonal: torch.Tensor, first: int) -> torch.Tensor:
        tiles = saliency(w, diagonal).reshape(rows // bn, bn * bk).sum(1)
        keep = largest_mask(tiles, column_tiles[first // bk])
        return keep.repeat_interleave(bn).unsqueeze(1).expand(rows, bk)

    updated, permuted_keep = reconstruct(weight[permutation], gram, choose, bk, damping, step)
    restored = torch.empty_like(updated)
    restored[permutation] = updated
    keep = torch.empty_like(permuted_keep)
    keep[permutation] = permuted_keep
    return BlockShuffledWeight.from_dense(restored.to(weight.dtype), keep, (bn, bk), permutation.to(INDEX_DTYPE))
