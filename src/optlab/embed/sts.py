"""Semantic similarity evaluation: Spearman (x 100) between cosine similarities of the
embeddings and human scores, on the shipped sets or a user's STS-B / SICK style file.

Each shipped set also comes in two disjoint halves, ``NAME:dev`` and ``NAME:test``, so a
demonstration can be chosen on one half and reported on the other: Lee's 50 documents are
split by document (25 and 25, a seeded permutation; a pair belongs to a half when both its
documents do, so 300 pairs each and the 625 cross pairs in neither), the word sets by pair
(a seeded permutation, half each; a word may occur in both halves, a pair never does).

>>> sts_pairs("wordsim353")[0]
('love', 'sex', 6.77)
>>> len(sts_pairs("lee:dev")), len(sts_pairs("lee:test")), len(sts_pairs("wordsim353:test"))
(300, 300, 177)
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import spearmanr

from optlab.core import data
from optlab.core.config import configurable, option
from optlab.core.files import read_text_file
from optlab.errors import OptlabError, did_you_mean

if TYPE_CHECKING:
    pass

SHIPPED = ("lee", "wordsim353", "simlex999")
HALVES = ("dev", "test")
SPLIT_SEED = 0  # fixed: the halves are part of the sets' names, not a run setting
NAMED = SHIPPED + tuple(f"{name}:{half}" for name in SHIPPED for half in HALVES)
# Column names of the layouts users have: STS-B (sentence1, sentence2, score) and SICK.
COLUMNS = (("sentence1", "sentence2", "score"), ("sentence_A", "sentence_B", "relatedness_score"))


def sts_pairs(name: str) -> list[tuple[str, str, float]]:
    """(text a, text b, human score) pairs of a shipped set (or its ``:dev`` / ``:test``
    half), or of a .tsv/.csv file with STS-B's or SICK's column names."""
    base, colon, half = name.rpartition(":")
    if colon and base in SHIPPED and half in HALVES:
        return _half(base, half)
    if name == "lee":  # 50 documents, every unordered pair once
        lee = data.lee_similarity()
        n = len(lee.docs)
        return [(lee.docs[i], lee.docs[j], float(lee.sims[i, j]))
                for i in range(n) for j in range(i + 1, n)]  # fmt: skip
    if name in data.WORD_PAIRS:
        return [(p.word1, p.word2, p.score) for p in data.word_pairs(name)]
    path = Path(name)
    if path.suffix not in (".tsv", ".csv"):
        raise OptlabError(f"{did_you_mean('STS set', name, NAMED)} Or give a .tsv or .csv "
                          "file with sentence1,sentence2,score (STS-B) or sentence_A,"
                          "sentence_B,relatedness_score (SICK) columns.")  # fmt: skip
    text = read_text_file(path, "STS file")
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix == ".tsv"
                               else ",", quoting=csv.QUOTE_NONE))  # fmt: skip
    header = set(rows[0]) if rows else set()
    for a, b, score in COLUMNS:
        if {a, b, score} <= header:
            try:
                return [(r[a], r[b], float(r[score])) for r in rows]
            except (TypeError, ValueError):
                raise OptlabError(f"{path}: a {score} value is not a number") from None
    raise OptlabError(
        f"{path}: no sentence1,sentence2,score (STS-B) or sentence_A,sentence_B,"
        f"relatedness_score (SICK) columns; it has {', '.join(sorted(header))}"
    )


def _half(name: str, half: str) -> list[tuple[str, str, float]]:
    """One of the two disjoint halves of a shipped set (see the module's docstring)."""
    rng = np.random.default_rng(SPLIT_SEED)
    if name == "lee":
        lee = data.lee_similarity()
        order = rng.permutation(len(lee.docs))
        docs = sorted(order[: len(order) // 2] if half == "dev" else order[len(order) // 2 :])
        return [(lee.docs[i], lee.docs[j], float(lee.sims[i, j]))
                for k, i in enumerate(docs) for j in docs[k + 1 :]]  # fmt: skip
    pairs = sts_pairs(name)
    order = rng.permutation(len(pairs))
    chosen = order[: len(order) // 2] if half == "dev" else order[len(order) // 2 :]
    return [pairs[i] for i in sorted(chosen)]


def sts_spearman(
    encode: Callable[[list[str]], np.ndarray], pairs: Sequence[tuple[str, str, float]]
) -> float:
    """Spearman x100 of the cosine of each pair's embeddings (``encode``: texts -> [n, d],
    each distinct text embedded once) with the pair's human score."""
    texts = list(dict.fromkeys(t for a, b, _ in pairs for t in (a, b)))
    vectors = np.asarray(encode(texts), dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
    row = {text: i for i, text in enumerate(texts)}
    cosine = np.array([vectors[row[a]] @ vectors[row[b]] for a, b, _ in pairs])
    return spearman_x100(cosine, np.array([g for *_, g in pairs]))


def spearman_x100(predicted: np.ndarray, gold: np.ndarray) -> float:
    """Spearman's rho between two score lists, times 100 (the STS convention)."""
    if len(predicted) < 2:
        raise OptlabError("an STS set needs at least two pairs")
    return float(100 * spearmanr(predicted, gold).statistic)


@configurable("sts")
@dataclass(frozen=True)
class STSEval:
    """The similarity sets to score (shipped: lee, wordsim353, simlex999; or files).

    >>> STSEval(sts=("lee", "wordsim353")).sts
    ('lee', 'wordsim353')
    """

    sts: tuple[str, ...] = option(SHIPPED, "comma-separated STS sets: lee, wordsim353, "
                                  "simlex999 (NAME:dev / NAME:test: disjoint halves) or a "
                                  ".tsv/.csv file", metavar="S1,S2")  # fmt: skip
    limit: int | None = option(None, "first N pairs of each set only")

    def __post_init__(self) -> None:
        sets = (self.sts,) if isinstance(self.sts, str) else tuple(self.sts)
        object.__setattr__(self, "sts", tuple(s.strip() for s in sets if s.strip()))
        if not self.sts:
            raise OptlabError("--sts is empty; e.g. --sts lee,wordsim353")
        for name in self.sts:
            if name not in NAMED and Path(name).suffix not in (".tsv", ".csv"):
                sts_pairs(name)  # raises the did-you-mean error
        if self.limit is not None and self.limit < 2:
            raise OptlabError(f"limit must be at least 2 pairs, got {self.limit}")
