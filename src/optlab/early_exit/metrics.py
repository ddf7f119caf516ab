"""Completion quality (spec section 4) from well-kept libraries, as the official evaluation
(``src/eval/evaluator.py``, through Hugging Face ``evaluate``) defines each metric.

- ``exact_match``: the share of predictions equal to their reference, character for
  character (no stripping, as the official code).
- ``edit_similarity``: rapidfuzz's normalized Levenshtein similarity, 1 - distance /
  max(len), averaged; ``edit_distance``: the mean raw distance (the official ``lev_dist``).
- ``rouge_l``: the mean ROUGE-L F1 over samples. No ROUGE package is installed, so this is
  rapidfuzz's LCS (``LCSseq``) over the tokens of the ``rouge_score`` package's default
  tokenizer (lower case, runs of [a-z0-9], what ``evaluate``'s rouge uses), with the standard
  F-measure 2PR / (P + R); an empty side scores 0 as there.
- ``chrf``: sacrebleu's corpus chrF (character 6-grams, beta 2), 0-100.
- ``bleu``: sacrebleu's corpus BLEU with the 13a tokenizer and no smoothing (``evaluate``'s
  bleu: the same n-grams and brevity penalty), 0-100.
- ``codebleu`` (optional): the ``codebleu`` package, weights 0.25 each as the official code.

>>> scores = completion_metrics(["return x + 1"], ["return x + 1"])
>>> scores["exact_match"], scores["rouge_l"], round(scores["bleu"], 6)
(1.0, 1.0, 100.0)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rapidfuzz.distance import LCSseq, Levenshtein
from sacrebleu.metrics import BLEU, CHRF

from optlab.errors import OptlabError

_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """``rouge_score``'s default tokenization: lower case, then runs of letters and digits."""
    return _ROUGE_TOKEN.findall(text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair (LCS of the tokens)."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    common = LCSseq.similarity(pred, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def codebleu(predictions: Sequence[str], references: Sequence[str], language: str) -> float:
    """CodeBLEU from the ``codebleu`` package (an optional extra)."""
    try:
        from codebleu import calc_codebleu
    except ImportError:
        raise OptlabError("CodeBLEU needs the codebleu package, which is not installed: "
                          "pip install codebleu (and its tree-sitter grammar for "
                          f"{language}), or leave CodeBLEU out") from None  # fmt: skip
    scores = calc_codebleu(list(references), list(predictions), lang=language,
                           weights=(0.25, 0.25, 0.25, 0.25))  # fmt: skip
    return float(scores["codebleu"])


def completion_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    codebleu_language: str | None = None,
) -> dict[str, float]:
    """Every metric of the spec over paired predictions and references (CodeBLEU only with
    ``codebleu_language``, e.g. ``python`` or ``java``)."""
    if len(predictions) != len(references) or not predictions:
        raise OptlabError(f"metrics need as many predictions as references, and some: got "
                          f"{len(predictions)} and {len(references)}")  # fmt: skip
    n = len(predictions)
    pairs = list(zip(predictions, references, strict=True))
    corpus = (list(predictions), [list(references)])
    scores = {
        "exact_match": sum(p == r for p, r in pairs) / n,
        "edit_similarity": sum(Levenshtein.normalized_similarity(p, r) for p, r in pairs) / n,
        "edit_distance": sum(Levenshtein.distance(p, r) for p, r in pairs) / n,
        "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / n,
        "chrf": CHRF().corpus_score(*corpus).score,
        "bleu": BLEU(tokenize="13a", smooth_method="none").corpus_score(*corpus).score,
    }
    if codebleu_language is not None:
        scores["codebleu"] = codebleu(predictions, references, codebleu_language)
    return scores
