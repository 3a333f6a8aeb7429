"""Input-channel permutations that let a vector-wise N:M mask keep more of a weight (after Pool & Yu,
"Channel Permutations for N:M Sparsity", NeurIPS 2021, with the choice shared by the V rows of a V-group).

Which input features share a run of m is an accident of their order. Reordering them, the columns of W and
the features of x alike, leaves the dense product unchanged (``x[..., perm] @ W[:, perm].T == x @ W.T``)
but changes what N:M pruning can keep. A layer that stores ``W[:, perm]`` pruned must therefore be fed
``x[..., perm]`` (or the previous layer must emit its output features in that order). Equivalently, the
mask found on ``W[:, perm]`` and scattered back (``mask[:, perm] = mask_perm``) is a mask on ``W`` itself:
the same product with no permutation at inference, though not N:M in the original order.
"""

from __future__ import annotations

import torch

from ..formats.pattern import holds_values
from .magnitude import check_prunable, check_scores, vector_sums

# Largest [pairs, m, m, V-groups] block of candidate swaps ranked at once (float32 elements, 16 MiB).
_CHUNK_ELEMENTS = 1 << 22
# A swap must raise the kept score of its two runs by more than this fraction (far above rounding error).
_RELATIVE_TOLERANCE = 1e-9
# Swaps a pair of runs may make per meeting: a second one is often worth it, later ones cost more than they gain.
_SWAPS_PER_MEETING = 2


def _kept_score(group_scores: torch.Tensor, n: int, m: int) -> float:
    """What N:M pruning keeps of V-group scores ``[G, K]``: per V-group and run of m columns the n largest, summed."""
    groups, cols = group_scores.shape
    return float(group_scores.reshape(groups, cols // m, m).topk(n, dim=-1).values.sum())


def _run_stats(run_scores: torch.Tensor, n: int) -> torch.Tensor:
    """Per run ``[R, m, G]`` (runs, their m columns, V-groups) and V-group: the kept sum, the n-th and the
    (n+1)-th largest score, as ``[R, 3, G]``; kept between rounds so only runs changed by a swap are re-sorted."""
    largest = run_scores.transpose(1, 2).topk(n + 1, dim=-1).values
    return torch.stack([largest[..., :n].sum(-1), largest[..., n - 1], largest[..., n]], dim=1)


def _gains_into(leaving: torch.Tensor, stats: torch.Tensor, newcomers: torch.Tensor) -> torch.Tensor:
    """Change ``[Q, i, j]`` in the kept score of runs (given by their :func:`_run_stats`) when their column
    ``leaving[:, i]`` ``[Q, a, G]`` makes way for ``newcomers[:, j]`` ``[Q, b, G]``, summed over V-groups.
    Exact under ties: a column tied with the (n+1)-th largest gives the same result kept or not."""
    _, nth, next_in = stats.to(leaving.dtype).unsqueeze(2).unbind(1)
    # Without a kept column the n kept are the others and the (n+1)-th; a newcomer must beat the n-th of them.
    loss = (next_in - leaving).clamp_max_(0).sum(-1)
    threshold = torch.where(leaving > next_in, next_in, nth)
    return loss.unsqueeze(2) + (newcomers.unsqueeze(1) - threshold.unsqueeze(2)).clamp_min_(0).sum(-1)


def _improve_pairs(
    column_scores: torch.Tensor, slots: torch.Tensor, stats: torch.Tensor, pairs: torch.Tensor, n: int
) -> int:
    """In each of the disjoint run ``pairs`` ``[Q, 2]``, swap a column of one run for a column of the other
    while that raises the pair's kept score, best swap first, up to ``_SWAPS_PER_MEETING`` times: all m * m
    swaps are ranked in float32 (half the memory traffic), the best one is re-evaluated in float64.
    ``column_scores`` is ``[K, G]``; ``slots`` ``[K / m, m]`` (the columns each run holds) and ``stats``
    (:func:`_run_stats` per run) are updated in place.
    Returns how many swaps were made."""
    m, v_groups = slots.shape[1], column_scores.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // (v_groups * m * m))
    swaps = 0
    for start in range(0, pairs.shape[0], chunk):
        first, second = pairs[start : start + chunk].unbind(1)
        for _ in range(_SWAPS_PER_MEETING):
            if not first.numel():
                break
            columns_1, columns_2 = slots[first], slots[second]
            runs_1, runs_2 = column_scores[columns_1], column_scores[columns_2]
            stats_1, stats_2 = stats[first], stats[second]
            rough_1, rough_2 = runs_1.float(), runs_2.float()
            rough = _gains_into(rough_1, stats_1, rough_2) + _gains_into(rough_2, stats_2, rough_1).transpose(1, 2)
            best = rough.flatten(1).argmax(1)
            pair = torch.arange(best.numel(), device=best.device)
            out_1, out_2 = runs_1[pair, best // m].unsqueeze(1), runs_2[pair, best % m].unsqueeze(1)
            gain = (_gains_into(out_1, stats_1, out_2) + _gains_into(out_2, stats_2, out_1)).view(-1)
            kept = (stats_1[:, 0] + stats_2[:, 0]).sum(-1)
            accepted = (gain > _RELATIVE_TOLERANCE * kept).nonzero().squeeze(1)
            first, second = first[accepted], second[accepted]
            i, j = best[accepted] // m, best[accepted] % m
            slots[first, i] = columns_2[accepted, j]
            slots[second, j] = columns_1[accepted, i]
            changed = torch.cat([first, second])
            stats[changed] = _run_stats(column_scores[slots[changed]], n)
            swaps += accepted.numel()
    return swaps


def _round_pairs(step: int, seats: int, labels: torch.Tensor) -> torch.Tensor:
    """Round ``step`` of the circle-method round robin over an even number of ``seats`` (one more than the runs
    when their number is odd: that seat is a bye): disjoint run pairs ``[Q, 2]``, each pair meeting once in
    every ``seats - 1`` consecutive rounds. ``labels`` maps seats to runs."""
    ring = torch.arange(1, seats).roll(-(step % (seats - 1)))
    order = torch.cat([torch.zeros(1, dtype=ring.dtype), ring])
    first, second = order[: seats // 2], order.flip(0)[: seats // 2]
    real = (first < labels.numel()) & (second < labels.numel())
    return torch.stack([labels[first[real]], labels[second[real]]], dim=1)


def search_permutation(
    weight: torch.Tensor,
    pattern: str,
    vector: int = 1,
    scores: torch.Tensor | None = None,
    iterations: int = 1,
    seed: int | None = None,
) -> torch.Tensor:
    """int64 permutation ``perm`` ``[K]`` of the input features such that N:M pruning ``weight[:, perm]``
    keeps at least the summed |w| (or ``scores``, e.g. Wanda's |w| * ||x||) that pruning ``weight`` keeps.

    Greedy channel swaps: starting from the identity, the runs of m inputs meet in pairs (a round robin in an
    order drawn from ``seed``) and each pair swaps one column for another, best swap first, while that raises
    their kept score (at most twice per meeting), evaluated exactly from the two runs alone. ``iterations``
    is the most sweeps, each meeting every pair of runs once at a cost of about N * K^2 / V score comparisons
    (one sweep of a 1024 x 1024 weight: 1-5 s at V=1, under 1 s at V >= 32 on two CPU cores); the search
    stops earlier once every pair has met without a swap; the identity for a weight without values (on the meta
    device or fake) to search. Deterministic for a given ``seed``; ``None`` draws one.
    Using a pruned ``weight[:, perm]`` requires inputs ``x[..., perm]`` (see the module docstring).
    """
    n, m = check_prunable(weight, pattern, vector)
    if scores is None:
        scores = weight.detach().abs()
    else:
        check_scores(scores, "scores", tuple(weight.shape))
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise TypeError(f"iterations: expected an int, got {type(iterations).__name__} {iterations!r}")
    if iterations < 0:
        raise ValueError(f"iterations: expected a non-negative number of sweeps, got {iterations}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed: expected an int or None, got {type(seed).__name__} {seed!r}")

    group_scores = vector_sums(scores, vector)
    cols = group_scores.shape[1]
    run_count = cols // m
    identity = torch.arange(cols, device=group_scores.device)
    if run_count < 2 or iterations == 0 or not (holds_values(weight) and holds_values(scores)):
        return identity
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    labels = torch.randperm(run_count, generator=generator)
    seats = run_count + run_count % 2
    column_scores = group_scores.t().contiguous()
    slots = identity.clone().view(run_count, m)
    stats = _run_stats(column_scores[slots], n)
    quiet_rounds = 0
    for step in range(iterations * (seats - 1)):
        pairs = _round_pairs(step, seats, labels).to(group_scores.device)
        quiet_rounds = 0 if _improve_pairs(column_scores, slots, stats, pairs, n) else quiet_rounds + 1
        if quiet_rounds == seats - 1:
            break
    perm = slots.view(cols)
    # Each accepted swap gains far more than rounding error; this check makes "never worse" unconditional.
    if _kept_score(group_scores[:, perm], n, m) < _kept_score(group_scores, n, m):
        return identity
    return perm


def kept_magnitude(weight: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of the total |w| that ``mask`` keeps, summed in float64 (1.0 for an all-zero weight):
    how much of a layer a pruning mask preserves, comparable across methods and patterns."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"weight: expected a floating-point torch.Tensor, got {got}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask: expected a bool torch.Tensor, got {got}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask: expected the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    magnitude = weight.detach().abs().to(torch.float64)
    total = float(magnitude.sum())
    if total == 0.0:
        return 1.0
    return float(magnitude[mask.to(magnitude.device)].sum()) / total
