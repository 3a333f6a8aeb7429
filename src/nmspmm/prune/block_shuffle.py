"""Row permutations for shuffled block-wise sparsity (after Shfl-BW: Huang et al., "Shfl-BW: Accelerating
Deep Neural Network Inference with Tensor-Core Aware Weight Pruning", DAC 2022), and magnitude pruning to it.

Block pruning keeps whole ``(bn, bk)`` tiles, the ``round((1 - sparsity) * total)`` tiles with the largest
summed |w| over the whole matrix. Which output features (rows) share a block-row is free: the product writes
its outputs back in the original order. Rows whose magnitude sits in the same column-blocks, grouped together,
give tiles that are either heavy or light, so the kept tiles hold more of the weight.

The search works on row profiles ``P[r, j]`` (the summed |w| of row r over column-block j): a group of bn rows
has tile magnitudes ``P[rows].sum(0)``, and the objective is the sum of the ``keep`` largest tile magnitudes
over all groups. With the kept tiles held fixed, the objective is linear in the assignment of rows to groups
(row r in group g contributes ``P[r]`` summed over g's kept column-blocks), and re-choosing the kept tiles
afterwards can only raise it; so exchanging rows between two groups by that linear gain never lowers the
objective, and the exchange that is best for a pair of groups is found by sorting.
"""

from __future__ import annotations

import torch

from ..formats.base import register_pruner
from ..formats.block_shuffled import INDEX_DTYPE, BlockShuffledWeight, check_block, check_block_weight
from ..formats.pattern import holds_values
from .magnitude import check_finite, check_scores, largest_mask

DEFAULT_ITERATIONS = 64
# An exchange must raise the objective by more than this fraction of it (far above float64 rounding).
_RELATIVE_TOLERANCE = 1e-9
# Power-iteration steps for the principal direction of a group of row profiles when splitting it in two.
_POWER_STEPS = 12


def check_block_sparsity(sparsity: float) -> None:
    """Validate the fraction of blocks to prune: a real number in [0, 1]."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity: expected a float in [0, 1], got {type(sparsity).__name__} {sparsity!r}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity: expected a fraction in [0, 1] of blocks to prune, got {sparsity}")


def check_block_prunable(weight: torch.Tensor, block: tuple[int, int], sparsity: float) -> tuple[int, int]:
    """Validate a weight to block-prune (type, shape against ``block``, finite values) and ``sparsity`` (a
    number in [0, 1]); return ``(bn, bk)``."""
    bn, bk = check_block(block)
    check_block_weight(weight, block)
    check_block_sparsity(sparsity)
    check_finite(weight)
    return bn, bk


def kept_block_count(block_rows: int, block_cols: int, sparsity: float) -> int:
    """How many of the ``block_rows * block_cols`` tiles a ``sparsity`` keeps: ``round((1 - sparsity) * total)``."""
    return round((1.0 - sparsity) * block_rows * block_cols)


def ranked_scores(weight: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """What block pruning ranks: ``weight`` (whose |w| the profiles sum) or the checked ``scores`` in its place."""
    if scores is None:
        return weight
    check_scores(scores, "scores", tuple(weight.shape))
    return scores.detach().to(weight.device)


def row_profiles(weight: torch.Tensor, bk: int) -> torch.Tensor:
    """float64 ``[N, K / bk]``: the summed |w| of every row over every column-block."""
    rows, cols = weight.shape
    return weight.detach().abs().to(torch.float64).view(rows, cols // bk, bk).sum(-1)


def tile_magnitudes(weight: torch.Tensor, block: tuple[int, int], row_permutation: torch.Tensor) -> torch.Tensor:
    """float64 ``[N / bn, K / bk]``: the summed |w| of every tile of ``weight[row_permutation]``."""
    bn, bk = block
    profiles = row_profiles(weight, bk)[row_permutation.long()]
    return profiles.view(-1, bn, profiles.shape[1]).sum(1)


def search_row_permutation(
    weight: torch.Tensor,
    block: tuple[int, int],
    sparsity: float,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    seed: int = 0,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64 permutation ``perm`` ``[N]`` of the rows such that block-pruning ``weight[perm]`` (to ``block``
    tiles at ``sparsity``) keeps at least the summed |w| that block-pruning ``weight`` keeps.

    Rows are first clustered into balanced groups of bn by recursive halving along the principal direction of
    their column-block profiles; then, for at most ``iterations`` rounds, disjoint pairs of groups (best pairs
    first) exchange the rows whose exchange raises the objective most, given the currently kept tiles (see the
    module docstring). The identity is returned unless the result keeps strictly more, and for a weight without
    values (on the meta device or fake) to search. ``scores`` (non-negative, the weight's shape; Wanda's, say)
    replace |w| as what the tiles keep. About 2.5 s for a 4096 x 4096 weight with 32 x 32 blocks on one CPU
    core. Deterministic for a given ``seed``.
    """
    bn, bk = check_block_prunable(weight, block, sparsity)
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise TypeError(f"iterations: expected an int, got {type(iterations).__name__} {iterations!r}")
    if iterations < 0:
        raise ValueError(f"iterations: expected a non-negative number of rounds, got {iterations}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__} {seed!r}")
    profiles = row_profiles(ranked_scores(weight, scores), bk)
    rows = profiles.shape[0]
    groups = rows // bn
    keep = kept_block_count(groups, profiles.shape[1], sparsity)
    identity = torch.arange(rows, device=profiles.device)
    if groups < 2 or keep in (0, groups * profiles.shape[1]) or not holds_values(weight):
        return identity
    generator = torch.Generator().manual_seed(seed)
    slots = _balanced_halving(profiles, bn, generator)
    _exchange_rows(profiles, slots, keep, iterations)
    slots = slots.sort(1).values
    permutation = slots[slots[:, 0].argsort()].flatten()
    searched = _objective(profiles, permutation.view(groups, bn), keep)
    return permutation if searched > _objective(profiles, identity.view(groups, bn), keep) else identity


def prune_block_shuffled(
    weight: torch.Tensor,
    sparsity: float,
    block: tuple[int, int] = (32, 32),
    *,
    search: bool = True,
    iterations: int | None = None,
    scores: torch.Tensor | None = None,
) -> BlockShuffledWeight:
    """Keep the ``round((1 - sparsity) * total)`` tiles of ``weight[perm]`` with the largest summed |w| (or summed
    ``scores``: non-negative, the weight's shape; Wanda's, say) (ties to the lower block-row, then block-column),
    ``perm`` from :func:`search_row_permutation` on the same scores when ``search`` (``iterations`` rounds, its
    default if None), else the identity; the result holds a detached copy. A weight
    without values (on the meta device or fake: :func:`holds_values`), where no tiles can be ranked, gives a
    shape-only weight of as many blocks in the placeholder structure, the first ones in row-major block order
    under the identity permutation (:meth:`BlockShuffledWeight.placeholder_indices`)."""
    bn, bk = check_block_prunable(weight, block, sparsity)
    if not isinstance(search, bool):
        raise TypeError(f"search: expected a bool, got {type(search).__name__} {search!r}")
    weight = weight.detach()
    ranked = ranked_scores(weight, scores)
    rows, cols = weight.shape
    if search:
        rounds = DEFAULT_ITERATIONS if iterations is None else iterations
        permutation = search_row_permutation(weight, (bn, bk), sparsity, iterations=rounds, scores=scores)
    else:
        if iterations is not None:
            raise ValueError("iterations: only used by the search; pass search=True or leave iterations=None")
        permutation = torch.arange(rows, device=weight.device)
    keep = kept_block_count(rows // bn, cols // bk, sparsity)
    if not holds_values(weight):
        fields = {"shape": [rows, cols], "block": [bn, bk]}
        return BlockShuffledWeight.placeholder(weight.new_empty(keep, bn, bk), fields)
    magnitudes = tile_magnitudes(ranked, (bn, bk), permutation)
    kept = largest_mask(magnitudes, keep)
    permuted_mask = kept.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    mask = torch.empty_like(permuted_mask)
    mask[permutation] = permuted_mask
    return BlockShuffledWeight.from_dense(weight, mask, (bn, bk), permutation.to(INDEX_DTYPE))


def _objective(profiles: torch.Tensor, slots: torch.Tensor, keep: int) -> float:
    """Sum of the ``keep`` largest tile magnitudes when group g holds the rows ``slots[g]``."""
    return float(profiles[slots].sum(1).flatten().topk(keep).values.sum())


def _balanced_halving(profiles: torch.Tensor, bn: int, generator: torch.Generator) -> torch.Tensor:
    """``[N / bn, bn]`` groups of rows: each set of rows is split, along the principal direction of its centred
    profiles, into two sets of whole groups (half each, rounded down and up), until sets are single groups."""
    pending = [torch.arange(profiles.shape[0], device=profiles.device)]
    done = []
    while pending:
        rows = pending.pop()
        groups = rows.numel() // bn
        if groups == 1:
            done.append(rows)
            continue
        centred = profiles[rows] - profiles[rows].mean(0)
        direction = torch.randn(profiles.shape[1], generator=generator, dtype=profiles.dtype).to(profiles.device)
        for _ in range(_POWER_STEPS):
            direction = centred.t() @ (centred @ direction)
            direction /= direction.norm().clamp_min(1e-300)
        order = torch.sort(centred @ direction, stable=True).indices
        split = groups // 2 * bn
        pending += [rows[order[:split]], rows[order[split:]]]
    return torch.stack(done)


def _exchange_rows(profiles: torch.Tensor, slots: torch.Tensor, keep: int, rounds: int) -> None:
    """Improve the groups ``slots`` ``[G, bn]`` in place: each round fixes the kept tiles, scores every row in
    every group, and lets disjoint pairs of groups (greedily, largest gain first) exchange the rows whose
    exchange gains most; stops after ``rounds`` rounds or when no exchange gains."""
    groups, bn = slots.shape
    every_group = torch.arange(groups, device=slots.device)
    for _ in range(rounds):
        tile_sums = profiles[slots].sum(1)
        kept = largest_mask(tile_sums, keep).to(profiles.dtype)
        objective = float((tile_sums * kept).sum())
        # scores[g, i, h]: kept magnitude row slots[g, i] would hold in group h; gains: over staying in g.
        scores = (profiles @ kept.t())[slots]
        gains = scores - scores[every_group, :, every_group].unsqueeze(-1)
        ranked, order = torch.sort(gains, dim=1, descending=True)
        prefix = ranked.cumsum(1).transpose(1, 2)
        exchange_gains, counts = (prefix + prefix.transpose(0, 1)).max(-1)
        pairs = _greedy_pairs(exchange_gains, _RELATIVE_TOLERANCE * objective)
        if not pairs.numel():
            return
        first, second = pairs.unbind(1)
        count = counts[first, second] + 1
        leaving_first = order[first, :, second]
        leaving_second = order[second, :, first]
        moving = torch.arange(bn, device=slots.device) < count.unsqueeze(1)
        pair_index, position = moving.nonzero().unbind(1)
        group_a, group_b = first[pair_index], second[pair_index]
        slot_a, slot_b = leaving_first[pair_index, position], leaving_second[pair_index, position]
        rows_a, rows_b = slots[group_a, slot_a], slots[group_b, slot_b]
        slots[group_a, slot_a] = rows_b
        slots[group_b, slot_b] = rows_a


def _greedy_pairs(gains: torch.Tensor, threshold: float) -> torch.Tensor:
    """Disjoint pairs ``[Q, 2]`` of groups from a symmetric gain matrix: repeatedly the pair of largest gain
    among groups not yet taken, while that gain exceeds ``threshold``."""
    upper = torch.triu(torch.ones_like(gains, dtype=torch.bool), diagonal=1) & (gains > threshold)
    candidates = upper.nonzero()
    order = torch.sort(gains[upper], descending=True, stable=True).indices
    taken: set[int] = set()
    chosen = []
    for first, second in candidates[order].tolist():
        if first not in taken and second not in taken:
            taken.update((first, second))
            chosen.append((first, second))
    return torch.tensor(chosen, dtype=torch.long, device=gains.device).view(-1, 2)


register_pruner(BlockShuffledWeight, "prune_block_shuffled", prune_block_shuffled)
