"""The vector-wise kernel's candidate configs: the grids the offline tuner sweeps (``benchmarks/tune_vector.py``)
and the sample ``nmspmm bench --check-configs`` times beside the model's choice, so that the benchmark reports
how often the choice (``nmspmm.kernels.choose_vector_config``) is within 10% of the best config tried."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
import triton

from ..kernels import VectorConfig
from ..kernels.launch import FEW_TOKENS

SMALL_TOKENS = FEW_TOKENS  # up to this many tokens the small-tile grid (split-K) applies, as in choose_vector_config


def large_configs(vector: int, dtype: torch.dtype) -> Iterator[VectorConfig]:
    """The tuner's grid for more than SMALL_TOKENS tokens: token tile, K step, warps, stages, operand order."""
    block_n = min(vector, 128)
    steps = (32, 64) if dtype == torch.float32 else (64, 128)
    for bm, bk, warps, stages, weight_first in itertools.product((64, 128, 256), steps, (4, 8), (3, 4), (False, True)):
        if bm == 256 and warps == 4:
            continue
        yield VectorConfig(bm, block_n, bk, warps, stages, 8, 1, weight_first)


def small_configs(vector: int, dtype: torch.dtype, tokens: int) -> Iterator[VectorConfig]:
    """The tuner's grid for few tokens: tile width, K step and split-K at the smallest token tile, 3 stages (as
    ``nmspmm.perf`` chooses them)."""
    bm = max(16, triton.next_power_of_2(tokens))
    steps = (64, 128) if dtype == torch.float32 else (64, 128, 256)
    widths = sorted({min(vector, 32), min(vector, 64)})
    for bn, bk, split in itertools.product(widths, steps, (1, 2, 4, 8)):
        yield VectorConfig(bm, bn, bk, 4, 3, 8, split, bn >= 32)


def sample_configs(tokens: int, vector: int, dtype: torch.dtype) -> list[VectorConfig]:
    """The sample the benchmark times beside the model's choice: the few-token grid whole (8-24 configs), every
    other config of the larger grid (20), enough to see a poor choice at a fraction of a full sweep's time."""
    if tokens <= SMALL_TOKENS:
        return list(small_configs(vector, dtype, tokens))
    return list(large_configs(vector, dtype))[::2]


def within(chosen_ms: float, best_ms: float, tolerance: float = 0.10) -> bool:
    """True when the chosen config's time is at most ``tolerance`` above the best time tried."""
    return chosen_ms <= best_ms * (1.0 + tolerance)
