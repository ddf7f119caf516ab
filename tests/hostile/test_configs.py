"""Config values: NaN, negative counts, budgets that make a method trivial, bad templates."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from optlab.core.models import load_model, save_model

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
        (["exit", "train", "tiny:opt", "--lr", "nan"], ["lr", "nan", "finite"]),
        (["exit", "train", "tiny:opt", "--steps", "0"], ["steps", "at least 1"]),
        (["exit", "train", "tiny:opt", "--eval-windows", "-1"], ["eval_windows", "-1"]),
        (["exit", "train", "tiny:opt", "--data", "stdlib"], ["--data 'stdlib'", "code:stdlib"]),
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


UNLEARN = ["unlearn", "tiny:opt", "--scenario", "book", "--no-save"]
SWEEP = ["unlearn", "sweep", "tiny:opt", "--scenario", "facts", "--methods", "ga", "--seeds", "0"]


@pytest.mark.parametrize("command", ["unlearn", "sweep"])
@pytest.mark.parametrize(
    ("flag", "value", "needles"),
    [
        ("--lr", "nan", ["lr", "nan", "finite"]),
        ("--beta", "nan", ["beta", "nan"]),
        ("--retain-weight", "nan", ["retain_weight", "nan"]),
        ("--retain-weight", "inf", ["retain_weight", "inf"]),
        ("--warmup", "inf", ["warmup", "inf"]),
        ("--alpha", "nan", ["alpha", "nan"]),
        ("--stop-forget-ce", "-inf", ["stop_forget_ce", "-inf"]),
        ("--teach-lr", "nan", ["lr", "nan", "--teach-lr"]),  # not to be mistaken for --lr
        ("--mink-ratio", "nan", ["mink_ratio", "nan"]),
        ("--eval-seq-len", "0", ["ppl_seq_len", "--eval-seq-len"]),
        ("--quant-aware", "q4_k", ["--quant-aware", "q4_k", "q4_1"]),
        ("--teach-quant-aware", "q4_k", ["--teach-quant-aware", "q4_k", "q4_1"]),
        ("--teach-quant-aware", "q4_1", ["--teach-quant-aware", "--teach-full"]),  # LoRA
    ],
)  # fmt: skip
def test_unlearning_values_are_refused_at_once(
    capsys, tmp_path, monkeypatch, command, flag, value, needles
) -> None:
    # Refused while the flags are read: no scenario is built, nothing loaded or trained.
    monkeypatch.setattr("optlab.unlearning.job.prepare", _never_called)
    args = UNLEARN if command == "unlearn" else SWEEP
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *args, f"{flag}={value}", "--out", tmp_path / "u")
    error_line(code, err, *needles)
    assert snapshot(tmp_path) == before


def _never_called(*args: object, **kwargs: object) -> None:
    raise AssertionError("training started before the bad value was refused")


@pytest.mark.parametrize("command", ["unlearn", "sweep"])
@pytest.mark.parametrize(
    ("flags", "named"),
    [(["--quant-aware", "q4_1"], "--quant-aware q4_1"),
     (["--teach-full", "--teach-quant-aware", "q4_1"], "--teach-quant-aware q4_1")],
)  # fmt: skip
def test_quant_aware_on_rows_of_partial_blocks_is_refused_before_any_work(
    capsys, tmp_path, monkeypatch, command, flags, named
) -> None:
    # A model whose MLP width (80) is not whole GGUF blocks of 32: refused before teaching and
    # the oracle (hours on a real model), not when the quant-aware training starts.
    lm = load_model("tiny:llama")
    config = copy.deepcopy(lm.model.config)
    config.intermediate_size = 80
    odd = save_model(replace(lm, model=type(lm.model)(config)), tmp_path / "odd")
    monkeypatch.setattr("optlab.unlearning.job.prepare", _never_called)
    args = [*(UNLEARN if command == "unlearn" else SWEEP), *flags]
    args[args.index("tiny:opt")] = str(odd)
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "u")
    error_line(code, err, named, "down_proj", "rows of 80", "multiple of 32")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("budget", "widths", "warned"),
    [("8", "8,4", True), ("16", None, True), ("7.5", "8,4", False)],
)
def test_a_budget_at_the_widest_width_is_warned_about(
    capsys, tmp_path, budget, widths, warned
) -> None:
    extra = ["--widths", widths] if widths else []
    code, _, err = run_cli(capsys, *QUANTIZE, "--avg-bits", budget, *extra, "--out", tmp_path / "q")
    assert code == 0, err
    lines = [line for line in err.splitlines() if "widest width" in line]
    assert len(lines) == int(warned) and all(f"--avg-bits {budget} " in line for line in lines)
