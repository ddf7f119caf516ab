"""Config values: NaN, negative counts, budgets that make a method trivial, bad templates."""

from __future__ import annotations

import pytest

from .conftest import error_line, run_cli, snapshot

QUANTIZE = ["quantize", "tiny:opt", "--no-eval", "--n-calib", "3"]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        ([*QUANTIZE, "--avg-bits", "nan"], ["avg_bits", "nan", "finite"]),
        ([*QUANTIZE, "--avg-bits", "inf"], ["avg_bits", "inf", "finite"]),
        ([*QUANTIZE, "--max-size", "nan"], ["max_size_mb", "nan"]),
        ([*QUANTIZE, "--avg-bits", "4", "--gptq", "--damp", "nan"], ["damp", "nan"]),
        ([*QUANTIZE, "--avg-bits", "4", "--sensitivity", "cmpq", "--cca-dims", "-1"],
         ["cca_dims", "-1", ">= 0"]),
        ([*QUANTIZE, "--avg-bits", "4", "--sensitivity", "pmpq", "--prune-fraction", "nan"],
         ["prune_fraction", "nan"]),
        (["retrain", "PRUNE_RUN", "--alpha", "nan"], ["alpha", "nan", "finite"]),
        (["retrain", "PRUNE_RUN", "--lr", "nan"], ["lr", "nan", "finite"]),
        (["audit", "skeb", "tiny:opt", "--format", "Q: {prompt} {x}"], ["--format", "{x}"]),
        (["audit", "skeb", "tiny:opt", "--format", "{prompt}}"], ["--format", "{prompt}}"]),
    ],
)  # fmt: skip
def test_bad_config_values_are_one_line(capsys, tmp_path, prune_run, args, needles) -> None:
    args = [prune_run if a == "PRUNE_RUN" else a for a in args]
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "o")
    line = error_line(code, err, *needles)
    assert "lower --lr" not in line
    assert snapshot(tmp_path) == before


def test_a_budget_above_every_width_is_warned_about_once(capsys, tmp_path) -> None:
    code, _, err = run_cli(capsys, *QUANTIZE, "--avg-bits", "99", "--out", tmp_path / "q")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "widest width" in line]
    assert len(warnings) == 1 and "--avg-bits 99" in warnings[0]
