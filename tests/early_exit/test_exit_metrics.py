"""Completion metrics on tiny cases worked by hand."""

from __future__ import annotations

import math
import sys

import pytest

from optlab.early_exit.metrics import completion_metrics, rouge_l, rouge_tokens
from optlab.errors import OptlabError


def test_exact_match_and_edit_similarity() -> None:
    scores = completion_metrics(["kitten", "a", "b "], ["sitting", "a", "b"])
    assert scores["exact_match"] == pytest.approx(1 / 3)  # "b " is not "b": no stripping
    # kitten -> sitting: 3 edits over max length 7; "a": 0; "b " -> "b": 1 over 2.
    assert scores["edit_distance"] == pytest.approx(4 / 3)
    assert scores["edit_similarity"] == pytest.approx((4 / 7 + 1 + 1 / 2) / 3)


def test_rouge_l_is_the_lcs_f_measure_of_rouge_tokens() -> None:
    assert rouge_tokens("self.Foo(bar_2)") == ["self", "foo", "bar", "2"]
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides: P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "a c" = 2: P = 2/3, R = 2/2, F = 2 * (2/3) / (5/3) = 0.8
    assert rouge_l("a b c", "a c") == pytest.approx(0.8)
    assert rouge_l("Foo(bar)", "foo bar") == 1.0
    assert rouge_l("", "x") == 0.0 and rouge_l("()", "x") == 0.0 and rouge_l("a", "b") == 0.0


def test_bleu_and_chrf_on_hand_cases() -> None:
    # Every n-gram precision is 1; the brevity penalty is exp(1 - 5/4).
    assert completion_metrics(["a b c d"], ["a b c d e"])["bleu"] == pytest.approx(
        100 * math.exp(-0.25))  # fmt: skip
    # abcdefg vs abcdefh: at order n, 7 - n of 8 - n character n-grams match on each side,
    # so P = R = F and chrF is their mean over n = 1..6.
    expected = 100 * sum((7 - n) / (8 - n) for n in range(1, 7)) / 6
    assert completion_metrics(["abcdefg"], ["abcdefh"])["chrf"] == pytest.approx(expected)
    disjoint = completion_metrics(["xyz"], ["abc"])
    assert disjoint["chrf"] == 0.0 and disjoint["bleu"] == 0.0
    same = completion_metrics(["return x + 1"], ["return x + 1"])
    assert same["chrf"] == pytest.approx(100) and same["bleu"] == pytest.approx(100)


def test_codebleu_is_optional_and_says_so(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "codebleu", None)
    assert "codebleu" not in completion_metrics(["a"], ["a"])
    with pytest.raises(OptlabError, match="codebleu package"):
        completion_metrics(["a"], ["a"], codebleu_language="python")


def test_mismatched_lists_are_refused() -> None:
    with pytest.raises(OptlabError, match="as many predictions"):
        completion_metrics(["a"], ["a", "b"])
    with pytest.raises(OptlabError, match="as many predictions"):
        completion_metrics([], [])
