"""Wanda masks and input-norm collection, SparseGPT's reconstruction and its layer-by-layer pass through a model,
the channel permutation search of N:M, the row permutation search of block pruning, and kept_magnitude."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import nmspmm

from nmspmm.prune import (
    collect_input_grams,
    collect_input_norms,
    kept_magnitude,
    magnitude_mask,
    prune_csr,
    prune_sequentially,
    search_permutation,
    sparsegpt,
    sparsegpt_block_shuffled,
    sparsegpt_csr,
    unstructured_mask,
    wanda_csr_mask,
    wanda_mask,
    wanda_scores,
)
from nmspmm.prune.block_shuffle import kept_block_count, prune_block_shuffled, search_row_permutation, tile_magnitudes

N, K = 128, 64


def wanda_reference(weight: torch.Tensor, norm: torch.Tensor, n: int, m: int, vector: int) -> torch.Tensor:
    """Brute force: per V-group and group of m, float64 sums of |w_ij| * ||x_j||, sorted by (-score, index)."""
    magnitudes, norms = weight.double().abs().tolist(), norm.double().tolist()
    rows, cols = weight.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for first in range(0, rows, vector):
        for start in range(0, cols, m):
            scores = [
                math.fsum(magnitudes[r][start + i] * norms[start + i] for r in range(first, first + vector))
                for i in range(m)
            ]
            for i in sorted(range(m), key=lambda i: (-scores[i], i))[:n]:
                mask[first : first + vector, start + i] = True
    return mask


def kept_score(scores: torch.Tensor, pattern: str, vector: int) -> float:
    """Sum of the scores that a magnitude-style N:M mask on ``scores`` keeps (float64)."""
    return float((scores.double() * magnitude_mask(scores, pattern, vector)).sum())


@pytest.mark.parametrize(("pattern", "vector"), [("2:4", 1), ("8:32", 32), ("4:32", 128), ("3:16", 16), ("32:64", 64)])
@pytest.mark.parametrize("fill", [1.0, 0.37, 1e-3])
def test_wanda_with_uniform_norms_is_magnitude(pattern: str, vector: int, fill: float) -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        weight = torch.randn(N, K, dtype=dtype)
        norm = torch.full((K,), fill)
        assert torch.equal(wanda_mask(weight, norm, pattern, vector), magnitude_mask(weight, pattern, vector))


@pytest.mark.parametrize(("pattern", "vector"), [("2:4", 1), ("1:4", 16), ("8:32", 32), ("4:32", 1), ("5:8", 128)])
def test_wanda_keeps_the_top_n_of_weight_times_norm(pattern: str, vector: int) -> None:
    n, m = (int(part) for part in pattern.split(":"))
    weight = torch.randn(N, K)
    norm = torch.exp(2 * torch.randn(K))  # norms spread over orders of magnitude, as activations are
    mask = wanda_mask(weight, norm, pattern, vector)
    assert torch.equal(mask, wanda_reference(weight, norm, n, m, vector))
    assert not torch.equal(mask, magnitude_mask(weight, pattern, vector))


def test_wanda_zero_norm_drops_the_input_and_accepts_float64_norms() -> None:
    weight = torch.ones(16, 8)
    norm = torch.tensor([1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 5.0, 4.0], dtype=torch.float64)
    mask = wanda_mask(weight, norm, "2:4", 16)
    assert mask[0].tolist() == [False, False, True, True, False, False, True, True]


@pytest.mark.parametrize(
    ("input_norm", "error", "message"),
    [
        (torch.ones(K + 1), ValueError, r"input_norm: expected shape \(64,\), got \(65,\)"),
        (torch.ones(1, K), ValueError, r"input_norm: expected shape \(64,\), got \(1, 64\)"),
        (torch.ones(K, dtype=torch.int64), TypeError, r"input_norm: expected a floating-point dtype, got torch.int64"),
        ([1.0] * K, TypeError, r"input_norm: expected a torch.Tensor, got list"),
        (torch.ones(K).index_fill(0, torch.tensor([5]), -1.0), ValueError, r"non-negative values, got -1.0 at index 5"),
        (torch.ones(K).index_fill(0, torch.tensor([7]), float("nan")), ValueError, r"got nan at index 7$"),
        (torch.ones(K).index_fill(0, torch.tensor([9]), float("inf")), ValueError, r"got inf at index 9$"),
    ],
)
def test_wanda_refuses_bad_norms(input_norm, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        wanda_mask(torch.randn(N, K), input_norm, "2:4", 1)


def test_wanda_checks_the_weight_like_magnitude() -> None:
    with pytest.raises(ValueError, match=r"vector: V=32 must divide out_features N=48"):
        wanda_mask(torch.ones(48, K), torch.ones(K), "2:4", 32)
    with pytest.raises(ValueError, match=r"weight: expected finite values, got nan at row 0, column 3"):
        wanda_mask(torch.ones(N, K).index_fill(1, torch.tensor([3]), float("nan")), torch.ones(K), "2:4", 1)


class KeywordModel(nn.Module):
    """Two linears and a keyword-only forward, to feed batches as mappings."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 3)
        self.second = nn.Linear(3, 2)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.second(torch.relu(self.first(x * scale)))


def hooks_left(model: nn.Module) -> int:
    return sum(len(module._forward_pre_hooks) + len(module._forward_hooks) for module in model.modules())


def test_collect_input_norms_matches_a_hand_computation() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    batches = [torch.randn(5, 4), (torch.randn(2, 3, 4),), [torch.randn(4)]]
    norms = collect_input_norms(model, batches)
    inputs = torch.cat([batches[0], batches[1][0].reshape(-1, 4), batches[2][0].reshape(1, 4)]).double()
    hidden = torch.relu(inputs @ model[0].weight.double().t() + model[0].bias.double())
    assert list(norms) == ["0", "2"]
    assert norms["0"].dtype == torch.float32 and norms["0"].shape == (4,)
    torch.testing.assert_close(norms["0"], inputs.square().sum(0).sqrt().float())
    torch.testing.assert_close(norms["2"], hidden.square().sum(0).sqrt().float())
    assert hooks_left(model) == 0


def test_collect_input_norms_with_mappings_and_names() -> None:
    model = KeywordModel()
    x = torch.randn(6, 4)
    norms = collect_input_norms(model, [{"x": x[:4], "scale": 2.0}, {"x": x[4:], "scale": 2.0}], names=["first"])
    assert list(norms) == ["first"]
    torch.testing.assert_close(norms["first"], (2 * x).double().square().sum(0).sqrt().float())
    # Without names, a linear that never ran is left out; named, it is an error.
    assert list(collect_input_norms(model, [{"x": x}])) == ["first", "second"]
    with pytest.raises(ValueError, match=r"names: these linears received no input .*\['unused'\]"):
        collect_input_norms(model, [{"x": x}], names=["first", "unused"])
    assert hooks_left(model) == 0


def test_collect_input_norms_accumulates_in_float64() -> None:
    # 1e4 squared is 1e8, past float16's range: squares must not be taken in the input's precision.
    model = nn.Linear(2, 1).to(torch.float16)
    norms = collect_input_norms(model, [torch.tensor([[300.0, 1.0]] * 4, dtype=torch.float16)])
    torch.testing.assert_close(norms[""], torch.tensor([600.0, 2.0]))


def test_collect_input_norms_removes_hooks_on_error() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(RuntimeError):
        collect_input_norms(model, [torch.randn(2, 4), torch.randn(2, 5)])
    assert hooks_left(model) == 0
    with pytest.raises(TypeError, match=r"batches: expected each batch to be a torch.Tensor, a Mapping .*got int"):
        collect_input_norms(model, [torch.randn(2, 4), 7])
    assert hooks_left(model) == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"model": "model"}, TypeError, r"model: expected a torch.nn.Module, got str"),
        ({"batches": []}, ValueError, r"batches: expected at least one batch, got none"),
        ({"names": ["0", "nope"]}, ValueError, r"names: expected names of nn.Linear modules of model, got \['nope'\]"),
        ({"names": ["1"]}, ValueError, r"names: expected names of nn.Linear modules of model, got \['1'\]"),
        ({"names": "0"}, TypeError, r"names: expected an iterable of module names, got the str '0'"),
    ],
)
@pytest.mark.parametrize("collect", [collect_input_norms, collect_input_grams])
def test_collect_input_statistics_bad_arguments(collect, kwargs: dict, error: type[Exception], message: str) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    arguments = {"model": model, "batches": [torch.randn(2, 4)], **kwargs}
    with pytest.raises(error, match=message):
        collect(**arguments)
    assert hooks_left(model) == 0


def assert_permutation(perm: torch.Tensor, cols: int) -> None:
    assert perm.dtype == torch.int64 and perm.shape == (cols,)
    assert torch.equal(perm.sort().values, torch.arange(cols))


@pytest.mark.parametrize(
    ("shape", "pattern", "vector"),
    [
        ((64, 256), "2:4", 1),
        ((128, 256), "2:4", 32),
        ((64, 128), "8:32", 16),
        ((128, 192), "4:32", 64),
        ((16, 40), "1:8", 1),
    ],
)
def test_search_never_keeps_less_than_the_identity(shape: tuple[int, int], pattern: str, vector: int) -> None:
    for seed in range(3):
        weight = torch.randn(shape) * torch.exp(torch.randn(shape[1]))  # columns of different scales
        perm = search_permutation(weight, pattern, vector, seed=seed)
        assert_permutation(perm, shape[1])
        before = kept_magnitude(weight, magnitude_mask(weight, pattern, vector))
        after = kept_magnitude(weight[:, perm], magnitude_mask(weight[:, perm], pattern, vector))
        assert after >= before
    assert after > before  # random weights always leave something to gain


def test_search_finds_the_obvious_swap() -> None:
    # The two large columns share the first run of 4, so 2:4 keeps only one... of each pair: swap one out.
    weight = torch.tensor([[10.0, 9.0, 8.0, 7.0, 1.0, 1.0, 1.0, 1.0]]).repeat(16, 1)
    perm = search_permutation(weight, "2:4", 16, seed=0)
    assert_permutation(perm, 8)
    assert kept_magnitude(weight, magnitude_mask(weight, "2:4", 16)) == pytest.approx(21 / 38)
    assert kept_magnitude(weight[:, perm], magnitude_mask(weight[:, perm], "2:4", 16)) == pytest.approx(34 / 38)


def test_search_optimises_the_given_scores() -> None:
    weight = torch.randn(32, 128)
    scores = weight.abs() * torch.exp(2 * torch.randn(128))
    perm = search_permutation(weight, "2:4", 1, scores=scores, seed=1)
    assert_permutation(perm, 128)
    assert kept_score(scores[:, perm], "2:4", 1) > kept_score(scores, "2:4", 1)


def test_search_is_deterministic_for_a_seed() -> None:
    weight = torch.randn(64, 256)
    first = search_permutation(weight, "2:4", 16, seed=7)
    assert torch.equal(first, search_permutation(weight.clone(), "2:4", 16, seed=7))
    assert_permutation(search_permutation(weight, "2:4", 16), 256)  # seed None: any valid permutation


def test_search_without_room_to_move_returns_the_identity() -> None:
    weight = torch.randn(8, 32)
    assert torch.equal(search_permutation(weight, "8:32", 1, seed=0), torch.arange(32))  # a single run
    assert torch.equal(search_permutation(weight, "2:4", 1, iterations=0, seed=0), torch.arange(32))
    assert torch.equal(search_permutation(torch.ones(8, 32), "2:4", 1, seed=0), torch.arange(32))  # all ties


def test_permuted_mask_scattered_back_is_the_same_mask() -> None:
    weight = torch.randn(64, 128)
    perm = search_permutation(weight, "2:4", 1, seed=0)
    permuted_mask = magnitude_mask(weight[:, perm], "2:4", 1)
    mask = torch.empty_like(permuted_mask)
    mask[:, perm] = permuted_mask
    x = torch.randn(5, 128)
    torch.testing.assert_close(x @ (weight * mask).t(), x[:, perm] @ (weight[:, perm] * permuted_mask).t())
    assert kept_magnitude(weight, mask) == pytest.approx(kept_magnitude(weight[:, perm], permuted_mask))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"scores": torch.ones(N, K + 4)}, ValueError, r"scores: expected shape \(128, 64\), got \(128, 68\)"),
        ({"scores": -torch.ones(N, K)}, ValueError, r"scores: .*non-negative values, got -1.0 at index \(0, 0\)"),
        ({"scores": torch.ones(N, K, dtype=torch.int32)}, TypeError, r"scores: expected a floating-point dtype"),
        ({"iterations": -1}, ValueError, r"iterations: expected a non-negative number of sweeps, got -1"),
        ({"iterations": 1.5}, TypeError, r"iterations: expected an int, got float 1.5"),
        ({"seed": "0"}, TypeError, r"seed: expected an int or None, got str '0'"),
        ({"pattern": "2:5"}, ValueError, r"pattern: m must be one of"),
        ({"vector": 3}, ValueError, r"vector: expected one of"),
    ],
)
def test_search_bad_arguments(kwargs: dict, error: type[Exception], message: str) -> None:
    arguments = {"weight": torch.randn(N, K), "pattern": "2:4", "vector": 16, **kwargs}
    with pytest.raises(error, match=message):
        search_permutation(**arguments)


def test_kept_magnitude() -> None:
    weight = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    assert kept_magnitude(weight, torch.tensor([[True, False], [False, True]])) == pytest.approx(0.5)
    assert kept_magnitude(weight.half(), torch.ones(2, 2, dtype=torch.bool)) == 1.0
    assert kept_magnitude(weight, torch.zeros(2, 2, dtype=torch.bool)) == 0.0
    assert kept_magnitude(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool)) == 1.0
    with pytest.raises(ValueError, match=r"mask: expected the weight's shape \(2, 2\), got \(2, 3\)"):
        kept_magnitude(weight, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask: expected a bool torch.Tensor, got torch.float32"):
        kept_magnitude(weight, torch.ones(2, 2))
    with pytest.raises(TypeError, match=r"weight: expected a floating-point torch.Tensor, got torch.int64"):
        kept_magnitude(torch.ones(2, 2, dtype=torch.int64), torch.ones(2, 2, dtype=torch.bool))


# ---- the row permutation search of block pruning (BlockShuffledWeight) --------------------------------------


@pytest.mark.parametrize("block", [(16, 16), (32, 16)])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_block_shuffled_search_is_never_worse_than_the_identity(block, sparsity):
    weight = torch.randn(128, 128, generator=torch.Generator().manual_seed(3))
    permutation = search_row_permutation(weight, block, sparsity)
    assert permutation.dtype == torch.int64 and sorted(permutation.tolist()) == list(range(128))
    keep = kept_block_count(128 // block[0], 128 // block[1], sparsity)

    def kept(perm: torch.Tensor) -> float:
        return float(tile_magnitudes(weight, block, perm).flatten().topk(keep).values.sum())

    assert kept(permutation) >= kept(torch.arange(128))
    assert torch.equal(permutation, search_row_permutation(weight, block, sparsity))


def planted_rows(rows: int, cols: int, block: tuple[int, int], seed: int) -> torch.Tensor:
    """Rows of two interleaved families (even and odd rows), each large on its own half of the column-blocks."""
    generator = torch.Generator().manual_seed(seed)
    blocks = cols // block[1]
    family_support = torch.zeros(2, blocks, dtype=torch.bool)
    family_support[0, torch.randperm(blocks, generator=generator)[: blocks // 2]] = True
    family_support[1] = ~family_support[0]
    scale = 1 + 9 * family_support[torch.arange(rows) % 2].repeat_interleave(block[1], 1).float()
    return torch.randn(rows, cols, generator=generator) * scale


def test_block_shuffled_search_recovers_planted_row_families():
    block = (16, 16)
    weight = planted_rows(128, 128, block, seed=4)
    identity = prune_block_shuffled(weight, 0.5, block, search=False)
    searched = prune_block_shuffled(weight, 0.5, block)
    before, after = kept_magnitude(weight, identity.mask()), kept_magnitude(weight, searched.mask())
    assert after > before + 0.3
    families = searched.row_permutation.long().view(-1, block[0]) % 2
    assert bool((families == families[:, :1]).all())  # every block-row holds one family


def test_block_shuffled_search_is_better_on_gaussian_weights_and_handles_trivial_cases():
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(5))
    identity = prune_block_shuffled(weight, 0.75, (16, 32), search=False)
    searched = prune_block_shuffled(weight, 0.75, (16, 32), iterations=8)
    assert kept_magnitude(weight, searched.mask()) > kept_magnitude(weight, identity.mask())
    for sparsity, block in [(0.0, (16, 16)), (1.0, (16, 16)), (0.5, (128, 16))]:
        assert torch.equal(search_row_permutation(weight, block, sparsity), torch.arange(128))
    halving_only = search_row_permutation(weight, (16, 32), 0.75, iterations=0)
    assert sorted(halving_only.tolist()) == list(range(128))


# ---- SparseGPT ------------------------------------------------------------------------------------------------


def _calibration(rows: int = 32, cols: int = 128, tokens: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and correlated calibration inputs with unequal feature scales (where reconstruction matters)."""
    generator = torch.Generator().manual_seed(7)
    mix = torch.randn(cols, cols, generator=generator) / cols**0.5 + torch.eye(cols)
    scale = torch.rand(cols, generator=generator) * 2 + 0.1
    x = (torch.randn(tokens, cols, generator=generator) @ mix) * scale
    return torch.randn(rows, cols, generator=generator), x.double()


def _output_error(x: torch.Tensor, weight: torch.Tensor, pruned: torch.Tensor) -> float:
    """Relative error of the layer's outputs on the calibration inputs, in float64."""
    reference = x @ weight.double().t()
    return float((reference - x @ pruned.double().t()).norm() / reference.norm())


def _least_squares_error(x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor) -> float:
    """The smallest output error any kept values under ``keep`` reach: a least-squares fit per row."""
    target = x @ weight.double().t()
    best = torch.zeros_like(weight, dtype=torch.float64)
    for row in range(weight.shape[0]):
        columns = keep[row].nonzero().squeeze(1)
        best[row, columns] = torch.linalg.lstsq(x[:, columns], target[:, row:row + 1]).solution.squeeze(1)
    return _output_error(x, weight, best)


@pytest.mark.parametrize(("pattern", "vector"), [("2:4", 1), ("4:8", 16), ("8:32", 32), ("16:32", 16)])
def test_sparsegpt_keeps_the_outputs_better_than_wanda_and_magnitude(pattern, vector):
    weight, x = _calibration()
    gram = x.t() @ x
    pruned = sparsegpt(weight, gram, pattern, vector)
    assert pruned.pattern == pattern and pruned.vector == vector and pruned.dtype == weight.dtype
    error = _output_error(x, weight, pruned.to_dense())
    wanda = weight * wanda_mask(weight, gram.diagonal().sqrt().float(), pattern, vector)
    magnitude = weight * magnitude_mask(weight, pattern, vector)
    assert error < _output_error(x, weight, wanda) < _output_error(x, weight, magnitude)
    # Near the best that its own mask allows (measured 1.09-1.22x on these layers).
    assert error <= 1.3 * _least_squares_error(x, weight, pruned.mask())


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_csr_keeps_the_outputs_better_than_magnitude(sparsity):
    weight, x = _calibration()
    gram = x.t() @ x
    pruned = sparsegpt_csr(weight, gram, sparsity)
    assert abs(pruned.nnz - (1 - sparsity) * weight.numel()) <= weight.shape[1] // 128 + 1  # rounded per block
    error = _output_error(x, weight, pruned.to_dense())
    assert error < _output_error(x, weight, weight * unstructured_mask(weight, sparsity))
    assert error <= 1.3 * _least_squares_error(x, weight, pruned.mask())


def test_sparsegpt_prunes_nothing_at_sparsity_zero_and_zeroes_unreached_inputs():
    weight, x = _calibration()
    assert torch.equal(sparsegpt_csr(weight, x.t() @ x, 0.0).to_dense(), weight)
    x[:, :4] = 0  # no calibration token reaches inputs 0-3: their weights do nothing and are zeroed (2:4 still keeps
    pruned = sparsegpt(weight, x.t() @ x, "2:4", 1)  # two of them, as the pattern must)
    assert bool(torch.isfinite(pruned.values).all()) and not bool(pruned.to_dense()[:, :4].any())


def test_sparsegpt_keeps_half_precision_weights():
    weight, x = _calibration()
    pruned = sparsegpt(weight.bfloat16(), x.t() @ x, "8:32", 16)
    assert pruned.dtype == torch.bfloat16
    assert _output_error(x, weight, pruned.to_dense().float()) < _output_error(
        x, weight, weight * magnitude_mask(weight, "8:32", 16)
    )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(gram=torch.eye(64)), ValueError, r"gram: expected shape \(128, 128\) \(the weight's in_features\)"),
        (dict(gram=torch.eye(128, dtype=torch.int64)), TypeError, "gram: expected a floating-point dtype"),
        (dict(gram=torch.full((128, 128), float("nan"))), ValueError, "gram: expected finite values"),
        (dict(gram="eye"), TypeError, "gram: expected a torch.Tensor, got str"),
        (dict(damping=0.0), ValueError, r"damping: expected a number in \(0, 1\), got 0.0"),
        (dict(columns=30), ValueError, "columns: expected a positive multiple of 4, got 30"),
        (dict(pattern="3:4", vector=3), ValueError, "vector"),
    ],
)
def test_sparsegpt_rejects_bad_arguments(change, error, match):
    weight, x = _calibration()
    arguments = dict(weight=weight, gram=x.t() @ x, pattern="2:4", vector=1) | change
    with pytest.raises(error, match=match):
        sparsegpt(**arguments)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(sparsity=1.0), ValueError, r"sparsity: expected a float in \[0, 1\), got 1.0"),
        (dict(gram=torch.eye(64)), ValueError, r"gram: expected shape \(128, 128\)"),
        (dict(weight=torch.randn(4, 128).int()), TypeError, "weight"),
        (dict(columns=0), ValueError, "columns: expected a positive multiple of 1, got 0"),
    ],
)
def test_sparsegpt_csr_rejects_bad_arguments(change, error, match):
    weight, x = _calibration()
    arguments = dict(weight=weight, gram=x.t() @ x, sparsity=0.5) | change
    with pytest.raises(error, match=match):
        sparsegpt_csr(**arguments)


def test_wanda_csr_mask_keeps_the_largest_scores_of_every_row():
    weight, norm = torch.randn(12, 40), torch.rand(40) * 3
    mask = wanda_csr_mask(weight, norm, 0.7)
    assert mask.sum(1).tolist() == [12] * 12  # round(0.3 * 40) in every row
    scores = weight.double().abs() * norm.double()
    for row in range(12):
        kept = sorted(range(40), key=lambda col: (-float(scores[row, col]), col))[:12]
        assert mask[row].nonzero().squeeze(1).tolist() == sorted(kept)
    assert torch.equal(wanda_csr_mask(weight, torch.ones(40), 0.0), torch.ones(12, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"input_norm: expected shape \(40,\), got \(39,\)"):
        wanda_csr_mask(weight, torch.ones(39), 0.5)
    with pytest.raises(ValueError, match=r"sparsity: expected a float in \[0, 1\)"):
        wanda_csr_mask(weight, norm, 1.0)


def test_block_pruning_ranks_by_the_scores_given():
    weight = torch.randn(64, 64)
    plain = prune_block_shuffled(weight, 0.75, (16, 16))
    # Scores of |w| are what it ranks without them; Wanda's with equal norms keep the same tiles.
    assert torch.equal(prune_block_shuffled(weight, 0.75, (16, 16), scores=weight.abs()).mask(), plain.mask())
    assert torch.equal(prune_block_shuffled(weight, 0.75, (16, 16), scores=wanda_scores(weight, torch.ones(64))).mask(),
                       plain.mask())
    # Inputs 0-15 carry all the activation: every kept tile lies over them, and the most such tiles are kept.
    norm = torch.cat([torch.full((16,), 100.0), torch.full((48,), 1e-3)])
    for search in (False, True):
        wanda = prune_block_shuffled(weight, 0.75, (16, 16), search=search, scores=wanda_scores(weight, norm))
        assert bool(wanda.mask()[:, :16].all()) and not bool(wanda.mask()[:, 16:].any())
    with pytest.raises(ValueError, match=r"scores: expected shape \(64, 64\), got \(64, 32\)"):
        prune_block_shuffled(weight, 0.75, (16, 16), scores=torch.ones(64, 32))
    with pytest.raises(ValueError, match=r"scores: expected finite, non-negative values, got -1.0"):
        prune_block_shuffled(weight, 0.75, (16, 16), scores=-torch.ones(64, 64))


@pytest.mark.parametrize(("sparsity", "block"), [(0.5, (16, 16)), (0.75, (16, 16)), (0.75, (32, 16))])
def test_sparsegpt_block_shuffled_keeps_the_outputs_better_than_wanda_and_magnitude(sparsity, block):
    weight, x = _calibration(rows=64, cols=128)
    gram = x.t() @ x
    pruned = sparsegpt_block_shuffled(weight, gram, sparsity, block)
    rows, cols = 64 // block[0], 128 // block[1]
    assert pruned.values.shape[0] == kept_block_count(rows, cols, sparsity) and pruned.dtype == weight.dtype
    error = _output_error(x, weight, pruned.to_dense())
    norm = gram.diagonal().sqrt().float()
    wanda = prune_block_shuffled(weight, sparsity, block, scores=wanda_scores(weight, norm)).to_dense()
    magnitude = prune_block_shuffled(weight, sparsity, block).to_dense()
    assert error < _output_error(x, weight, wanda) < _output_error(x, weight, magnitude)
    assert error <= 1.3 * _least_squares_error(x, weight, pruned.mask())
    # Every block-column keeps as many tiles as Wanda's choice gives it.
    def column_counts(weight: nmspmm.BlockShuffledWeight) -> list[int]:
        return weight.mask()[weight.row_permutation.long()].reshape(rows, block[0], cols, block[1])[:, 0, :, 0].sum(0)

    wanda_weight = prune_block_shuffled(weight, sparsity, block, scores=wanda_scores(weight, norm))
    assert torch.equal(pruned.row_permutation, wanda_weight.row_permutation)
    assert column_counts(pruned).tolist() == column_counts(wanda_weight).tolist()


def test_sparsegpt_block_shuffled_rejects_bad_arguments():
    weight, x = _calibration(rows=64, cols=128)
    with pytest.raises(ValueError, match=r"columns: expected a positive multiple of 16, got 24"):
        sparsegpt_block_shuffled(weight, x.t() @ x, 0.5, (16, 16), columns=24)
    with pytest.raises(ValueError, match=r"gram: expected shape \(128, 128\)"):
        sparsegpt_block_shuffled(weight, torch.eye(64), 0.5, (16, 16))
    with pytest.raises(TypeError, match=r"search: expected a bool, got str"):
        sparsegpt_block_shuffled(weight, x.t() @ x, 0.5, (16, 16), search="yes")


def test_collect_input_grams_matches_a_hand_computation():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    batches = [torch.randn(5, 4), torch.randn(2, 3, 4)]
    grams = collect_input_grams(model, batches)
    inputs = torch.cat([batches[0], batches[1].reshape(-1, 4)]).double()
    hidden = torch.relu(inputs @ model[0].weight.double().t() + model[0].bias.double())
    assert list(grams) == ["0", "2"] and grams["0"].dtype == torch.float64
    torch.testing.assert_close(grams["0"], inputs.t() @ inputs)
    torch.testing.assert_close(grams["2"], hidden.t() @ hidden)
    assert hooks_left(model) == 0


class Attention(nn.Module):
    """q, k and v of one input tensor, then o; an MLP after it; and a head that may run twice per batch."""

    def __init__(self, width: int = 16, head_twice: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.head = nn.Linear(width, width)
        self.head_twice = head_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), dim=-1)
        x = x + self.o(scores @ self.v(x))
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(self.head(x)) if self.head_twice else self.head(x)


def _sequential_by_hand(model: nn.Module, batches: list[torch.Tensor], prune_layer) -> dict[str, torch.Tensor]:
    """The reference procedure written out: for each layer in order, its Gram over all batches on the model with
    the earlier layers pruned (one full forward per layer), then the layer pruned in place."""
    names = ["q", "k", "v", "o", "up", "down", "head"]
    for name in names:
        module = getattr(model, name)
        inputs = []
        handle = module.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].double()))
        with torch.no_grad():
            for batch in batches:
                model(batch)
        handle.remove()
        gram = sum(x.reshape(-1, x.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) for x in inputs)
        with torch.no_grad():
            module.weight.copy_(prune_layer(name, module.weight.detach(), gram).to_dense())
    return {name: getattr(model, name).weight.detach().clone() for name in names}


@pytest.mark.parametrize("head_twice", [False, True])
def test_prune_sequentially_is_the_reference_procedure(head_twice):
    torch.manual_seed(0)
    model = Attention(head_twice=head_twice)
    batches = [torch.randn(2, 5, 16) for _ in range(3)]
    seen: list[str] = []

    def prune_layer(name, weight, gram):
        seen.append(name)
        if head_twice and name == "head":
            return sparsegpt_csr(weight, gram, 0.5)
        return sparsegpt(weight, gram, "2:4", 1)

    reference = copy.deepcopy(model)
    expected = _sequential_by_hand(reference, batches, lambda name, weight, gram: prune_layer(name, weight, gram))
    seen.clear()
    calls = {"head": 0}
    model.head.register_forward_pre_hook(lambda module, args: calls.__setitem__("head", calls["head"] + 1))
    pruned = prune_sequentially(model, batches, prune_layer)
    assert seen == list(expected) and list(pruned) == list(expected)
    for name, weight in expected.items():
        torch.testing.assert_close(getattr(model, name).weight.detach(), weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(pruned[name].to_dense(), weight, rtol=1e-6, atol=1e-7)
    # q, k and v share one pass, and a pass stops at its group's last layer: the head runs in the pass that finds
    # the order and in its own. A head that runs twice per batch lets no pass stop early (one full pass per group).
    runs_per_batch = 2 if head_twice else 1
    passes = 1 + (5 if head_twice else 1)  # groups: (q, k, v), o, up, down, head
    assert calls["head"] == passes * runs_per_batch * len(batches)
    assert hooks_left(model) == 1  # the counter above


def test_prune_sequentially_restores_the_weights_on_an_error():
    model = Attention()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    def prune_layer(name, weight, gram):
        if name == "up":
            raise ValueError("up: cannot")
        return sparsegpt(weight, gram, "2:4", 1)

    with pytest.raises(ValueError, match="up: cannot"):
        prune_sequentially(model, [torch.randn(2, 5, 16)], prune_layer)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
    assert hooks_left(model) == 0


def test_prune_sequentially_bad_arguments():
    model = Attention()
    with pytest.raises(ValueError, match=r"batches: expected at least one batch, got none"):
        prune_sequentially(model, [], lambda name, weight, gram: prune_csr(weight, 0.5))
    with pytest.raises(ValueError, match=r"names: expected names of nn.Linear modules of model, got \['x'\]"):
        prune_sequentially(model, [torch.randn(2, 5, 16)], lambda name, weight, gram: prune_csr(weight, 0.5), ["x"])
    wrapped = _Wrapped(nn.ModuleDict({"model": model, "spare": nn.Linear(4, 4)}))
    with pytest.raises(ValueError, match=r"names: these linears received no input .*\['inner.spare'\]"):
        prune_sequentially(wrapped, [torch.randn(2, 5, 16)], lambda name, weight, gram: prune_csr(weight, 0.5),
                           ["inner.model.q", "inner.spare"])
    assert hooks_left(model) == 0


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner["model"](x)
