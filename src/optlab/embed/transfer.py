"""Transfer classification on frozen embeddings (the paper's SentEval protocol, spec section
4): logistic regression, k-fold cross-validation, accuracy x 100 (mean and std over folds).

Tasks: ``sentiment`` (the 200 Pang & Lee movie-review sentences that gensim ships, labelled
positive / negative) or a user's ``.csv`` / ``.tsv`` / ``.jsonl`` file with ``text`` and
``label`` columns (any label values; two classes or more). Deviation from SentEval: instead
of tuning the L2 penalty in an inner cross-validation, the features are standardized per
fold (fitted on the training folds) and scikit-learn's default penalty (C = 1) is used.

>>> texts, labels = classification_set("sentiment")
>>> len(texts), sorted(set(labels))
(200, ['0', '1'])
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from optlab.core import data
from optlab.core.config import configurable, option, require
from optlab.core.files import read_text_file
from optlab.errors import OptlabError, did_you_mean

SHIPPED = ("sentiment",)
FILE_TYPES = (".csv", ".tsv", ".jsonl")


def classification_set(name: str) -> tuple[list[str], list[str]]:
    """(texts, labels as strings) of a shipped task or a text,label file."""
    if name == "sentiment":
        sentences = data.sentiment_sentences()
        return [s.text for s in sentences], [str(s.label) for s in sentences]
    path = Path(name).expanduser()
    if path.suffix not in FILE_TYPES:
        raise OptlabError(f"{did_you_mean('classification task', name, SHIPPED)} Or give a "
                          ".csv, .tsv or .jsonl file with text and label columns.")  # fmt: skip
    rows: list[tuple[str, Any]] = []
    if path.suffix == ".jsonl":
        for number, obj in data.read_jsonl(path, "classification file"):
            if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
                raise OptlabError(f"{path}:{number}: expected an object with 'text' and "
                                  "'label' fields")  # fmt: skip
            rows.append((obj["text"], obj["label"]))
    else:
        text = read_text_file(path, "classification file")
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix == ".tsv"
                                else ",")  # fmt: skip
        if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
            raise OptlabError(f"{path}: needs 'text' and 'label' columns; it has "
                              f"{', '.join(reader.fieldnames or [])}")  # fmt: skip
        rows = [(r["text"], r["label"]) for r in reader]
    for number, (text, label) in enumerate(rows, 1):
        if not isinstance(text, str) or not text.strip() or label in (None, ""):
            raise OptlabError(f"{path}: example {number} has no text or no label")
        if isinstance(label, (dict, list)):
            raise OptlabError(f"{path}: example {number}'s label is not a plain value")
    if not rows:
        raise OptlabError(f"{path}: no examples in it")
    return [t for t, _ in rows], [str(label) for _, label in rows]


def check_folds(labels: list[str], folds: int, where: str) -> None:
    """Stratified k-fold needs two classes and at least k examples of each."""
    counts = Counter(labels)
    require(len(counts) >= 2, f"{where}: needs at least two labels, it has {len(counts)}")
    rare, n = min(counts.items(), key=lambda kv: kv[1])
    require(n >= folds, f"{where}: label {rare!r} has {n} examples, fewer than the {folds} "
            "folds (lower --folds)")  # fmt: skip


def cross_val_accuracy(
    features: np.ndarray, labels: list[str], folds: int = 10, seed: int = 0
) -> tuple[float, float]:
    """Mean and std (x 100) of the held-out accuracy of logistic regression over stratified
    k folds (shuffled with ``seed``, so two encoders given the same seed share the folds).

    >>> x = np.array([[0.0], [0.1], [0.2], [1.0], [1.1], [1.2]])
    >>> cross_val_accuracy(x, ["a", "a", "a", "b", "b", "b"], folds=3)
    (100.0, 0.0)
    """
    y = np.asarray(labels)
    accuracy = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, y):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        model.fit(features[train], y[train])
        accuracy.append(100 * float(np.mean(model.predict(features[test]) == y[test])))
    return float(np.mean(accuracy)), float(np.std(accuracy))


@configurable("transfer")
@dataclass(frozen=True)
class TransferEval:
    """Transfer classification tasks (``sentiment`` or text,label files) and the folds.

    >>> TransferEval(classify=("sentiment",), folds=5).folds
    5
    """

    classify: tuple[str, ...] = option((), "comma-separated classification tasks: sentiment "
                                       "or a .csv/.tsv/.jsonl file with text,label columns",
                                       metavar="T1,T2")  # fmt: skip
    folds: int = option(10, "cross-validation folds (k) of the classification")

    def __post_init__(self) -> None:
        tasks = (self.classify,) if isinstance(self.classify, str) else tuple(self.classify)
        object.__setattr__(self, "classify", tuple(t.strip() for t in tasks if t.strip()))
        require(self.folds >= 2, f"--folds must be at least 2, got {self.folds}")
        for name in self.classify:
            if name not in SHIPPED and Path(name).suffix not in FILE_TYPES:
                classification_set(name)  # raises the did-you-mean error
