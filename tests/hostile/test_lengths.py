"""Context lengths: one rule for every command (an explicit window beyond the model's
context is an error naming both numbers; a default is capped), and no wrong perplexity."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from optlab.core.models import load_model
from optlab.errors import OptlabError
from optlab.eval.perplexity import perplexity, wiki_perplexity
from optlab.eval.scorer import Scorer, window_length

from .conftest import TEXT, error_line, run_cli, snapshot

PRUNE = ["prune", "tiny:opt", "--method", "magnitude", "--eval-limit", "1"]
QUANTIZE = ["quantize", "tiny:opt", "--uniform", "8", "--eval-limit", "1"]


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        ([*PRUNE, "--seq-len", "32", "--eval-seq-len", "5000"], "--eval-seq-len 5000"),
        ([*PRUNE, "--seq-len", "5000"], "--seq-len 5000"),
        (["prune", "tiny:opt", "--n-calib", "2", "--seq-len", "5000"], "--seq-len 5000"),
        ([*QUANTIZE, "--seq-len", "5000"], "--seq-len 5000"),
        ([*QUANTIZE, "--eval-seq-len", "5000"], "--eval-seq-len 5000"),
        (["eval", "tiny:opt", "--seq-len", "5000"], "--seq-len 5000"),
    ],
)
def test_a_window_beyond_the_context_names_both_numbers(capsys, tmp_path, args, flag) -> None:
    code, out, err = run_cli(capsys, *args, "--out", tmp_path / "o")
    error_line(code, err, flag, "context length 256")
    assert out == "" and list(tmp_path.iterdir()) == []


def test_unlearn_eval_window_beyond_the_context(capsys, tmp_path) -> None:
    for name in ("forget", "retain"):
        (tmp_path / f"{name}.jsonl").write_text('{"question": "Q?", "answer": "A"}\n' * 2)
    before = snapshot(tmp_path)
    code, _, err = run_cli(
        capsys, "unlearn", "tiny:opt", "--forget", tmp_path / "forget.jsonl", "--retain",
        tmp_path / "retain.jsonl", "--steps", "1", "--samples", "2", "--eval-limit", "1",
        "--eval-seq-len", "5000", "--no-save", "--out", tmp_path / "u",
    )  # fmt: skip
    error_line(code, err, "--eval-seq-len 5000", "256")
    assert snapshot(tmp_path) == before


def test_a_failed_forced_run_leaves_the_old_run_byte_identical(capsys, tmp_path, prune_run) -> None:
    old = tmp_path / "old"
    shutil.copytree(prune_run, old)
    before = snapshot(old)
    code, _, err = run_cli(capsys, *PRUNE, "--seq-len", "5000", "--force", "--out", old)
    error_line(code, err, "--seq-len 5000")
    assert snapshot(old) == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_default_windows_are_capped_at_a_short_context(capsys, tmp_path, prune_run) -> None:
    """quantize and retrain default to 512 tokens; tiny:opt holds 256 (an IndexError once)."""
    code, _, err = run_cli(capsys, "quantize", "tiny:opt", "--sensitivity", "cmpq",
                           "--avg-bits", "4.5", "--n-calib", "3", "--no-eval",
                           "--out", tmp_path / "q")  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(
        capsys,
        "retrain",
        prune_run,
        "--method",
        "perp",
        "--steps",
        "1",
        "--grad-accum",
        "1",
        "--eval-limit",
        "1",
        "--out",
        tmp_path / "r",
    )
    assert code == 0, err
    assert "seq_len: 256" in (tmp_path / "r" / "config.yaml").read_text()  # what was used


def test_window_length_rule() -> None:
    model = load_model("tiny:opt").model
    assert window_length(model, None) == 256
    assert window_length(model, 64) == 64
    assert window_length(model, 512, default=512) == 256  # a default is capped
    with pytest.raises(OptlabError, match=r"--eval-seq-len 512 exceeds .* 256"):
        window_length(model, 512, what="--eval-seq-len")
    with pytest.raises(OptlabError, match="positive"):
        window_length(model, 0)


def test_perplexity_counts_the_tokens_it_really_scored() -> None:
    lm = load_model("tiny:opt")
    result = perplexity(Scorer(lm, progress=False), TEXT, seq_len=100)
    assert result.tokens == result.windows * 99
    # A scorer whose window is shorter than the windows asked for refuses; it used to cut the
    # rows and divide by the uncut count (perplexity 1.343 instead of about 311).
    with pytest.raises(OptlabError, match="cannot score 99 tokens"):
        perplexity(Scorer(lm, max_length=32, progress=False), TEXT, seq_len=100)
    full = wiki_perplexity(lm, None, limit=1, progress=False)
    assert full["seq_len"] == 256 and full["tokens"] == 255 and 100 < full["perplexity"] < 1000
    assert math.isclose(full["nll"], math.log(full["perplexity"]))


def test_generation_longer_than_the_context_is_refused() -> None:
    scorer = Scorer(load_model("tiny:opt"), progress=False)
    with pytest.raises(OptlabError, match=r"--max-new-tokens 300 .* context of 256"):
        scorer.generate(["Hello"], max_new_tokens=300)
    assert len(scorer.generate(["Hello"], max_new_tokens=4)) == 1


def test_skeb_max_new_tokens_beyond_the_context(capsys, tmp_path) -> None:
    code, _, err = run_cli(capsys, "audit", "skeb", "tiny:opt", "--limit", "1",
                           "--max-new-tokens", "300", "--out", tmp_path / "s")  # fmt: skip
    error_line(code, err, "--max-new-tokens 300", "256")
    assert list(Path(tmp_path).iterdir()) == []


def _never(what: str):
    def called(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{what} ran before the bad window was refused")

    return called


def _qa_files(folder: Path) -> list[object]:
    for name in ("forget", "retain"):
        (folder / f"{name}.jsonl").write_text('{"question": "Q?", "answer": "A"}\n' * 2)
    return ["--forget", folder / "forget.jsonl", "--retain", folder / "retain.jsonl"]


@pytest.mark.parametrize(
    ("case", "work"),
    [
        ("prune eval window", "optlab.pruning.pruner.prune"),
        ("prune window", "optlab.pruning.pruner.prune"),
        ("quantize eval window", "optlab.eval.perplexity.wiki_perplexity"),
        ("retrain eval window", "optlab.retraining.perp.retrain"),
        ("unlearn eval window", "optlab.unlearning.job.prepare"),
        ("sweep eval window", "optlab.unlearning.job.prepare"),
    ],
)
def test_a_bad_window_is_refused_before_any_work(
    capsys, tmp_path, monkeypatch, prune_run, case, work
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    qa = _qa_files(inputs)
    args = {
        "prune eval window": [*PRUNE, "--seq-len", "32", "--eval-seq-len", "5000"],
        "prune window": [*PRUNE, "--seq-len", "5000"],
        "quantize eval window": [*QUANTIZE, "--eval-seq-len", "5000"],
        "retrain eval window": ["retrain", prune_run, "--steps", "1", "--eval-seq-len", "5000"],
        "unlearn eval window": ["unlearn", "tiny:opt", *qa, "--steps", "1", "--no-save",
                                "--eval-seq-len", "5000"],
        "sweep eval window": ["unlearn", "sweep", "tiny:opt", *qa, "--methods", "ga", "--seeds",
                              "0", "--steps", "1", "--eval-seq-len", "5000"],
    }[case]  # fmt: skip
    monkeypatch.setattr(work, _never(work))
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "o")
    error_line(code, err, "5000", "context length 256")
    assert snapshot(tmp_path) == before
