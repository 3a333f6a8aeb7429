"""The text the quality study calibrates, recovers and evaluates on, written for the project and shipped with it
(no data set can be downloaded at run time, and text taken from installed packages changes between versions).

- ``corpus/calibration.txt``: 2,300 sentences, one per line, on everyday life, science, technology and work,
  society and culture, and mixed registers (stories, messages, notices, reviews, search queries), for Wanda's
  input norms, SparseGPT's Gram matrices and the recovery's distillation.
- ``corpus/pairs.tsv``: 240 graded sentence pairs, ``grade<TAB>first<TAB>second`` with grade ``paraphrase``
  (100), ``related`` (80) or ``unrelated`` (60), for the similarity measures; none of their sentences is a
  calibration sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

GRADES = ("paraphrase", "related", "unrelated")
"""Pair grades, most similar first."""


@dataclass(frozen=True)
class GradedPair:
    """Two sentences and how alike they are (one of :data:`GRADES`)."""

    grade: str
    first: str
    second: str


def _lines(name: str) -> list[str]:
    text = resources.files(__package__).joinpath("corpus", name).read_text(encoding="utf-8")
    return text.splitlines()


@cache
def calibration_sentences() -> tuple[str, ...]:
    """The calibration sentences, in the file's order (mixed topics: any prefix is varied)."""
    sentences = tuple(_lines("calibration.txt"))
    for number, sentence in enumerate(sentences, 1):
        if not sentence or sentence != sentence.strip():
            raise ValueError(f"corpus/calibration.txt: line {number} is empty or has surrounding spaces")
    if len(set(sentences)) != len(sentences):
        raise ValueError("corpus/calibration.txt: a sentence appears twice")
    return sentences


@cache
def graded_pairs() -> tuple[GradedPair, ...]:
    """The graded pairs, checked: three fields a line, a known grade, no sentence used twice."""
    pairs = []
    for number, line in enumerate(_lines("pairs.tsv"), 1):
        fields = line.split("\t")
        if len(fields) != 3 or fields[0] not in GRADES or not all(fields[1:]):
            raise ValueError(f"corpus/pairs.tsv: line {number}: expected 'grade<TAB>first<TAB>second' with grade in "
                             f"{GRADES}, got {line!r}")
        pairs.append(GradedPair(*fields))
    sentences = [sentence for pair in pairs for sentence in (pair.first, pair.second)]
    if len(set(sentences)) != len(sentences):
        raise ValueError("corpus/pairs.tsv: a sentence appears twice")
    return tuple(pairs)
