"""The benchmark's cases: the NM-SpMM paper's suite of LLaMA-family layers (``shapes.json``), and filters."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from importlib import resources

DTYPES = ("bfloat16", "float16", "float32", "tf32")


@dataclass(frozen=True)
class Case:
    """One product ``Y[M, N] = X[M, K] @ W[N, K].T`` with W pruned to ``pattern`` at vector length V."""

    tokens: int
    rows: int
    cols: int
    pattern: str
    vector: int
    dtype: str


def load_suite() -> dict:
    """The suite definition shipped with the package (a copy of the team's shapes.json)."""
    return json.loads(resources.files("nmspmm.bench").joinpath("shapes.json").read_text())


def suite_cases(
    tokens: list[int] | None = None,
    layers: list[tuple[int, int]] | None = None,
    patterns: list[str] | None = None,
    vectors: list[int] | None = None,
    dtypes: list[str] | None = None,
    decode: bool = False,
) -> list[Case]:
    """Every combination of the given (default: the suite's) tokens, layers, patterns, vectors and dtypes;
    ``decode`` adds the suite's decode token counts (1, 8, 16, 64)."""
    suite = load_suite()
    tokens = list(tokens or suite["tokens_M"]) + (suite["decode_tokens_M"] if decode else [])
    layers = layers or [tuple(layer) for layer in suite["layers_NK"]]
    patterns = patterns or [p for group in suite["sparsities"].values() for p in group]
    vectors = vectors or suite["vector_lengths_V"]
    dtypes = dtypes or ["bfloat16"]
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"dtypes: expected names from {DTYPES}, got {dtype!r}")
    return [
        Case(m, n, k, pattern, vector, dtype)
        for dtype, pattern, vector, m, (n, k) in itertools.product(dtypes, patterns, vectors, tokens, layers)
        if n % vector == 0 and k % int(pattern.split(":")[1]) == 0
    ]


def quick_cases() -> list[Case]:
    """The quick set: the suite's five quick shapes at the four 32-group sparsities and 2:4 with V=64 in
    bf16, and at V=32 in exact fp32 (the NM-SpMM paper's setting)."""
    shapes = load_suite()["quick"]["cases_MNK"]
    patterns = ["16:32", "12:32", "8:32", "4:32", "2:4"]
    cases = [Case(m, n, k, p, 64, "bfloat16") for p in patterns for m, n, k in shapes]
    cases += [Case(m, n, k, p, 32, "float32") for p in patterns[:4] for m, n, k in shapes]
    return cases
