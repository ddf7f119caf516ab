"""The model-free parts of the robustness audit: attack specs, the recovery ratio on a
hand-made table, the paired bootstrap, and the relearning set's disjointness."""

from __future__ import annotations

import math

import pytest

from optlab.audit.robustness import (
    NONE,
    RobustnessConfig,
    markdown_table,
    parse_attack,
    recovery_ratio,
    recovery_table,
    relearn_set,
)
from optlab.core.stats import bootstrap_ci, paired_bootstrap
from optlab.errors import OptlabError
from optlab.unlearning.data import Example

# A hand-made table: FA 0.8 before unlearning, 0.2 after; each attack moves it somewhere.
TABLE = {
    "before": {
        NONE: {"FA": 0.8, "RA": 0.9, "mia_loss": 0.60, "mia_mink": 0.50, "ppl": 20.0},
        "quant:rtn4": {"FA": 0.7, "RA": 0.8, "mia_loss": 0.6, "mia_mink": 0.5, "ppl": 25.0},
    },
    "unlearned": {
        NONE: {"FA": 0.2, "RA": 0.85, "mia_loss": 0.595, "mia_mink": 0.70, "ppl": 21.0},
        "quant:rtn4": {"FA": 0.5, "RA": 0.8, "mia_loss": 0.9, "mia_mink": 0.9, "ppl": 26.0},
        "quant:rtn8": {"FA": 0.2, "RA": 0.85, "mia_loss": 0.6, "mia_mink": 0.7, "ppl": 21.0},
        "relearn:4": {"FA": 0.9, "RA": 0.9, "mia_loss": 0.6, "mia_mink": 0.7, "ppl": 21.0},
        "prune:wanda50": {"FA": 0.1, "RA": 0.5, "mia_loss": 0.6, "mia_mink": 0.7, "ppl": 40.0},
    },
}


def test_recovery_ratio_on_a_hand_made_table() -> None:
    table = recovery_table(TABLE, min_gap=0.01)
    fa = {attack: row["FA"]["ratio"] for attack, row in table.items()}
    # (attacked - unlearned) / (before - unlearned) with before 0.8 and unlearned 0.2
    assert fa["quant:rtn4"] == pytest.approx(0.5)  # half of what was removed comes back
    assert fa["quant:rtn8"] == pytest.approx(0.0)  # nothing comes back
    assert fa["relearn:4"] == pytest.approx(7 / 6)  # more than was removed
    assert fa["prune:wanda50"] == pytest.approx(-1 / 6)  # forgets even more
    # mia_loss: unlearning lowered it by 0.005 < min_gap; mia_mink: unlearning raised it.
    for metric in ("mia_loss", "mia_mink"):
        cell = table["quant:rtn4"][metric]
        assert cell["ratio"] is None and "nothing to recover" in cell["reason"]
    assert "RA" not in table["quant:rtn4"] and "ppl" not in table["quant:rtn4"]  # utility
    text = markdown_table(TABLE, table)
    assert "| unlearned | quant:rtn4 | 0.5 |" in text and "| quant:rtn4 | 0.50 | n/a" in text


def test_recovery_ratio_edges() -> None:
    assert recovery_ratio(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert recovery_ratio(0.5, 0.2, 0.2) is None  # nothing was forgotten
    assert recovery_ratio(0.5, 0.2, 0.205, min_gap=0.01) is None  # too little to divide by
    assert recovery_ratio(0.5, 0.2, 0.1) is None  # unlearning raised the metric
    assert recovery_ratio(math.nan, 0.2, 0.8) is None and recovery_ratio(None, 0.2, 0.8) is None


def test_paired_bootstrap_keeps_the_pairing() -> None:
    base = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    shifted = [v + 1 for v in base]
    # Resampled together, the difference of the means is exactly 1 in every resample.
    found = paired_bootstrap([base, shifted], lambda m: m[1] - m[0], resamples=200, seed=3)
    assert found["value"] == pytest.approx(1.0)
    assert found["low"] == pytest.approx(1.0) and found["high"] == pytest.approx(1.0)
    # An undefined statistic leaves every resample out and the interval null.
    none = paired_bootstrap([base], lambda m: None, resamples=50)
    assert none["undefined"] == 50 and none["low"] is None
    # The one-column case is the plain bootstrap of the mean, seeded.
    plain = bootstrap_ci(base, resamples=200, seed=3)
    assert plain["mean"] == pytest.approx(0.5) and 0.0 <= plain["low"] < 0.5 < plain["high"]
    assert plain == bootstrap_ci(base, resamples=200, seed=3)


def test_attack_specs() -> None:
    assert parse_attack("prune:wanda50").amount == 50
    assert parse_attack("relearn:12").kind == "relearn"
    assert parse_attack("gguf:q5_0") == parse_attack(" gguf:q5_0 ")
    assert (parse_attack("gguf:q8_0").method, parse_attack("gguf:q8_0").amount) == ("q8_0", 8)
    with pytest.raises(OptlabError, match="Did you mean 'gguf:q4_1'"):
        parse_attack("gguf:q4_2")
    with pytest.raises(OptlabError, match="Did you mean 'quant:rtn4'"):
        parse_attack("quant:rnt4")
    with pytest.raises(OptlabError, match="percentage"):
        parse_attack("prune:wanda100")
    with pytest.raises(OptlabError, match="repeated"):
        RobustnessConfig(attacks=("quant:rtn4", "quant:rtn4"))
    with pytest.raises(OptlabError, match="at least one attack"):
        RobustnessConfig(attacks=("",))


def test_the_relearn_set_is_disjoint_from_the_forget_set() -> None:
    forget = [Example("Paris", "What is the capital of France?"), Example("A passage.")]
    retain = [
        Example("Rome", "What is the capital of Italy?"),
        Example("Lyon", "What is the capital of France?"),  # a forget question
        Example("A passage."),  # a forget document
        Example("Madrid", "What is the capital of Spain?"),
        Example("Lima", "What is the capital of Peru?"),
    ]
    chosen = relearn_set(forget, retain, 3, evaluated=1)
    keys = {e.text for e in forget} | {e.question for e in forget if e.question}
    assert all(e.text not in keys and e.question not in keys for e in chosen)
    # The retain items RA is measured on (the first one here) come last.
    assert [e.answer for e in chosen] == ["Madrid", "Lima", "Rome"]
    with pytest.raises(OptlabError, match=r"relearn:4 needs 4 .* has 3"):
        relearn_set(forget, retain, 4)
