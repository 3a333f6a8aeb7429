"""The project's calibration corpus and graded pairs (nmspmm.bench.corpus): shipped, sized as documented,
disjoint where the study needs it, and checked on load; and the study's similarity measures."""

from __future__ import annotations

import pytest
import torch

from nmspmm.bench import corpus
from nmspmm.bench.corpus import GRADES, calibration_sentences, graded_pairs
from nmspmm.bench.quality import (
    CALIBRATION_SENTENCES,
    FIXED_SENTENCES,
    paraphrase_recall,
    reconstruction_quality,
    spearman,
)


def test_the_corpus_has_the_documented_size_and_no_repeats():
    sentences = calibration_sentences()
    assert len(sentences) == 2300 and len(set(sentences)) == len(sentences)
    assert sum(len(sentence.split()) for sentence in sentences) > 20_000
    pairs = graded_pairs()
    assert [sum(pair.grade == grade for pair in pairs) for grade in GRADES] == [100, 80, 60]
    assert [pair.grade for pair in pairs] == sorted((pair.grade for pair in pairs), key=GRADES.index)


def test_evaluation_text_is_not_calibration_text():
    calibration = set(calibration_sentences()) | set(CALIBRATION_SENTENCES)
    paired = {sentence for pair in graded_pairs() for sentence in (pair.first, pair.second)}
    assert not calibration & paired
    assert not calibration & set(FIXED_SENTENCES)


@pytest.mark.parametrize(
    ("reader", "text", "match"),
    [
        (graded_pairs, "paraphrase\ta\tb\nsimilar\tc\td\n",
         r"corpus/pairs.tsv: line 2: expected 'grade<TAB>first<TAB>second'"),
        (graded_pairs, "related\ta\tb\nunrelated\tb\tc\n", r"corpus/pairs.tsv: a sentence appears twice"),
        (graded_pairs, "related\ta\n", r"line 1: expected"),
        (calibration_sentences, "one\n\nthree\n", r"line 2 is empty"),
        (calibration_sentences, "one\n two\n", r"line 2 is empty or has surrounding spaces"),
        (calibration_sentences, "one\none\n", r"a sentence appears twice"),
    ],
)
def test_a_damaged_corpus_file_is_refused(monkeypatch, reader, text, match):
    monkeypatch.setattr(corpus, "_lines", lambda name: text.splitlines())
    reader.cache_clear()
    try:
        with pytest.raises(ValueError, match=match):
            reader()
    finally:
        reader.cache_clear()


def test_spearman_matches_a_hand_computation():
    first = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(first, first * 10 + 3) == pytest.approx(1.0)
    assert spearman(first, -first) == pytest.approx(-1.0)
    # Ties take their average rank: ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4].
    tied = torch.tensor([1.0, 2.0, 2.0, 3.0])
    ranks, plain = torch.tensor([1.0, 2.5, 2.5, 4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = float(((ranks - ranks.mean()) * (plain - plain.mean())).sum()
                     / ((ranks - ranks.mean()).norm() * (plain - plain.mean()).norm()))
    assert spearman(tied, torch.tensor([5.0, 6.0, 7.0, 8.0])) == pytest.approx(expected)


def test_paraphrase_recall_counts_own_nearest_among_paraphrases():
    second = torch.eye(3)
    first = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 1.0]])  # pair 1 finds pair 0's second
    assert paraphrase_recall(first, second, torch.tensor([True, True, False])) == pytest.approx(0.5)
    assert paraphrase_recall(first, second, torch.tensor([True, False, True])) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rows": ["2:4 V=2"]}, r"rows: expected labels from \[.*'2:4 V=1'.*\], got \['2:4 V=2'\]"),
        ({"methods": ("magnitude", "obs")}, r"methods: expected names from \(.*\), got 'obs'"),
        ({"methods": ("sparsegpt+recovery", "sparsegpt")}, r"'sparsegpt\+recovery' continues from 'sparsegpt'"),
    ],
)
def test_the_methods_study_names_its_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        reconstruction_quality(**kwargs)
