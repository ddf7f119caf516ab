"""Runs, sweeps and the CLI on a tiny model that has memorised a few capitals."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from optlab.cli import main
from optlab.core.models import load_model
from optlab.unlearn.job import RUNS_COLUMNS, sweep
from optlab.unlearn.metrics import EvalConfig
from optlab.unlearn.scenarios import known_facts
from optlab.unlearn.trainer import UnlearnConfig
from tests.unlearn.conftest import capital_questions

QUICK_EVAL = EvalConfig(max_new_tokens=8, samples=8, ppl_seq_len=64, ppl_limit=1)
EVAL_FLAGS = ["--max-new-tokens", "8", "--samples", "8", "--eval-seq-len", "64",
              "--eval-limit", "1"]  # fmt: skip


def test_sweep_writes_the_documented_columns_and_retain_only_is_the_oracle(
    taught_model, tmp_path
) -> None:
    lm = load_model(str(taught_model))
    known = known_facts(
        lm, max_new_tokens=8, progress=False, questions=capital_questions(24), cache=False
    )
    config = UnlearnConfig(steps=2, lr=1e-3)
    result = sweep(lm, ["ga", "retain_only"], [1], tmp_path / "sweep", config=config,
                   eval_config=QUICK_EVAL, scenario_options={"known": known},
                   progress=False)  # fmt: skip
    with open(result["runs_csv"], newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames[: len(RUNS_COLUMNS)]) == RUNS_COLUMNS
    assert [(r["run_id"], r["method"], r["seed"]) for r in rows] == [
        ("ga-seed1", "ga", "1"), ("retain_only-seed1", "retain_only", "1")]  # fmt: skip
    assert {r["dataset"] for r in rows} == {"facts"}
    for row in rows:
        for column in RUNS_COLUMNS[4:]:
            float(row[column])  # every metric is a number
        assert "base_FA" in row and "ppl" in row and "mia_loss" in row
    oracle_rows = [r for r in rows if r["method"] == "retain_only"]
    # Same seed, same data, same start: retain_only reproduces the oracle exactly.
    assert all(float(r["distance"]) == 0.0 and float(r["AD"]) == 0.0 for r in oracle_rows)
    assert all(float(r["distance"]) > 0 for r in rows if r["method"] == "ga")
    assert (tmp_path / "sweep" / "ga-seed1" / "metrics.json").exists()


def test_cli_unlearns_user_files_and_writes_the_suite(taught_model, tmp_path, capsys) -> None:
    pairs = [e for _, e in capital_questions(16)]
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    holdout = tmp_path / "holdout.txt"  # documents work as well as pairs
    forget.write_text("".join(json.dumps(e.to_json()) + "\n" for e in pairs[:4]))
    retain.write_text("".join(json.dumps(e.to_json()) + "\n" for e in pairs[4:12]))
    holdout.write_text("\n\n".join(e.text for e in pairs[12:]))
    out = tmp_path / "run"
    argv = ["unlearn", str(taught_model), "--forget", str(forget), "--retain", str(retain),
            "--holdout", str(holdout), "--method", "graddiff", "--lora", "--steps", "3",
            "--retain-weight", "2",
            "--lr", "1e-2", "--out", str(out), "--json", *EVAL_FLAGS]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("FA", "RA", "MIA", "AD", "JS", "distance", "ppl", "mia_minkpp"):
        assert key in result and key in result["base"]
        assert not math.isnan(result[key]), key
    assert result["training"]["optimizer_steps"] == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["retain_weight"] == 2.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["FA"] == result["FA"] and (out / "model" / "config.json").exists()
    assert (out / "forget.jsonl").read_text() == forget.read_text()
    assert load_model(str(out)).model is not None
    # The same data, re-scored through `optlab eval`: the attacks are deterministic.
    assert main(["eval", str(out), "--tasks", f"unlearn:{out}", "--limit", "8", "--seq-len",
                 "64", "--json"]) == 0  # fmt: skip
    scored = json.loads(capsys.readouterr().out)["tasks"][f"unlearn:{out}"]
    assert scored["mia_loss"] == pytest.approx(result["mia_loss"])
    assert scored["MIA"] == pytest.approx(result["MIA"])
    # The run exists: refused before any work, nothing lost.
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scenario", "facts", "--forget", "x.jsonl"], "not both"),
        (["--scenario", "fact"], "Did you mean 'facts'"),
        ([], "give --scenario"),
        (["--method", "gd", "--scenario", "facts"], "unlearning method"),
        (["--forget", "missing.jsonl"], "not found"),
    ],
)
def test_cli_errors_exit_2_with_one_line(taught_model, tmp_path, capsys, extra, message) -> None:
    argv = ["unlearn", str(taught_model), "--out", str(tmp_path / "r"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("optlab: error:")
    assert not (tmp_path / "r").exists()
