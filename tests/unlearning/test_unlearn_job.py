"""Runs, sweeps, replays and the CLI on a tiny model that has memorised a few capitals."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

import optlab.commands  # noqa: F401  (registers the commands)
from optlab.api import rerun, unlearn, unlearn_sweep
from optlab.cli import main
from optlab.core.config import config_from_dict, config_to_dict
from optlab.core.job import Job, load_job
from optlab.core.models import load_model
from optlab.errors import OptlabError
from optlab.unlearning.job import RUNS_COLUMNS, SweepConfig
from optlab.unlearning.metrics import EvalConfig
from optlab.unlearning.scenarios import Scenario, UnlearnData, facts_scenario, known_facts
from optlab.unlearning.trainer import TeachConfig, UnlearnConfig
from tests.unlearning.conftest import capital_questions

QUICK_EVAL = EvalConfig(max_new_tokens=8, samples=8, ppl_seq_len=64, ppl_limit=1)
EVAL_FLAGS = ["--max-new-tokens", "8", "--samples", "8", "--eval-seq-len", "64",
              "--eval-limit", "1"]  # fmt: skip
# What a replay must reproduce exactly (timings and memory are not results).
REPLAYED = ("FA", "RA", "MIA", "AD", "JS", "distance", "ppl", "mia_loss", "mia_minkpp", "losses")


def write_files(tmp_path) -> tuple:
    """forget / retain .jsonl of taught capitals and a .txt holdout (documents work too)."""
    pairs = [e for _, e in capital_questions(16)]
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    holdout = tmp_path / "holdout.txt"
    forget.write_text("".join(json.dumps(e.to_json()) + "\n" for e in pairs[:4]))
    retain.write_text("".join(json.dumps(e.to_json()) + "\n" for e in pairs[4:12]))
    holdout.write_text("\n\n".join(e.text for e in pairs[12:]))
    return forget, retain, holdout


def read_rows(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return list(reader.fieldnames or []), rows


def test_sweep_writes_the_documented_columns_and_retain_only_is_the_oracle(
    taught_model, tmp_path
) -> None:
    lm = load_model(str(taught_model))
    known = known_facts(
        lm, max_new_tokens=8, progress=False, questions=capital_questions(24), cache=False
    )
    config = UnlearnConfig(steps=2, lr=1e-3)
    data = facts_scenario(lm, 1, known=known)
    result = unlearn_sweep(lm, ["ga", "retain_only"], [1], data=data, config=config,
                           evaluation=QUICK_EVAL, out=tmp_path / "sweep",
                           progress=False)  # fmt: skip
    fieldnames, rows = read_rows(result["runs_csv"])
    assert tuple(fieldnames[: len(RUNS_COLUMNS)]) == RUNS_COLUMNS
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
    # Examples given in Python are recorded, and the sweep does not pretend it can replay.
    recorded = yaml.safe_load((tmp_path / "sweep" / "config.yaml").read_text())["data"]
    assert recorded == {"given_in_python": [len(data.forget), len(data.retain),
                                            len(data.holdout)]}  # fmt: skip
    with pytest.raises(OptlabError, match="given in Python"):
        rerun(tmp_path / "sweep", out=tmp_path / "again")


def test_cli_unlearns_user_files_and_writes_the_suite(taught_model, tmp_path, capsys) -> None:
    forget, retain, holdout = write_files(tmp_path)
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
    assert "losses" not in result  # in metrics.json, not on the terminal
    assert yaml.safe_load((out / "config.yaml").read_text())["method"]["retain_weight"] == 2.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["FA"] == result["FA"] and (out / "model" / "config.json").exists()
    assert len(metrics["losses"]) == 3
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
    # config.yaml is the job: it reads back to the configs the flags gave.
    job = load_job(out)
    assert job.configs["method"] == UnlearnConfig(method="graddiff", lora=True, steps=3,
                                                  retain_weight=2.0, lr=1e-2)  # fmt: skip
    assert job.configs["data"] == UnlearnData(forget=str(forget), retain=str(retain),
                                              holdout=str(holdout))  # fmt: skip
    assert job.configs["eval"] == QUICK_EVAL and job.configs["teach"] == TeachConfig()
    assert Job.from_dict(yaml.safe_load(yaml.safe_dump(job.to_dict()))) == job
    # `optlab rerun` replays it: the same metrics, the same config.yaml.
    again = tmp_path / "again"
    assert main(["rerun", str(out), "--out", str(again), "--json"]) == 0
    capsys.readouterr()
    replayed = json.loads((again / "metrics.json").read_text())
    assert {k: replayed[k] for k in REPLAYED} == {k: metrics[k] for k in REPLAYED}
    assert replayed["base"] == metrics["base"]
    assert yaml.safe_load((again / "config.yaml").read_text()) == yaml.safe_load(
        (out / "config.yaml").read_text()
    )


def test_cli_sweep_runs_on_user_files_and_each_run_replays(taught_model, tmp_path, capsys) -> None:
    forget, retain, holdout = write_files(tmp_path)
    out = tmp_path / "sweep"
    argv = ["unlearn", "sweep", str(taught_model), "--forget", str(forget), "--retain",
            str(retain), "--holdout", str(holdout), "--methods", "ga,graddiff", "--seeds", "1,2",
            "--steps", "2", "--lr", "1e-3", "--out", str(out), "--json", *EVAL_FLAGS]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runs"] == 4 and result["runs_csv"] == str(out / "runs.csv")
    fieldnames, rows = read_rows(out / "runs.csv")
    assert tuple(fieldnames[: len(RUNS_COLUMNS)]) == RUNS_COLUMNS
    assert [r["run_id"] for r in rows] == ["ga-seed1", "graddiff-seed1", "ga-seed2",
                                           "graddiff-seed2"]  # fmt: skip
    assert {r["dataset"] for r in rows} == {"files"}
    # The files are the same for every seed: the base model measures the same.
    assert rows[0]["base_FA"] == rows[2]["base_FA"] and rows[0]["base_ppl"] == rows[2]["base_ppl"]
    for row in rows:
        assert all(not math.isnan(float(row[c])) for c in RUNS_COLUMNS[4:]), row
    sweep_job = load_job(out)
    assert sweep_job.configs["sweep"] == SweepConfig(("ga", "graddiff"), (1, 2))
    assert sweep_job.seed == 1
    # Each run's config.yaml is the single unlearn job: rerun gives its metrics again.
    single = load_job(out / "graddiff-seed2")
    assert single.command == "unlearn" and single.seed == 2
    assert single.configs["method"] == UnlearnConfig(method="graddiff", steps=2, lr=1e-3, seed=2)
    assert single.configs["output"].save is False
    rerun(out / "graddiff-seed2", out=tmp_path / "replay", progress=False)
    recorded = json.loads((out / "graddiff-seed2" / "metrics.json").read_text())
    replayed = json.loads((tmp_path / "replay" / "metrics.json").read_text())
    assert {k: replayed[k] for k in REPLAYED} == {k: recorded[k] for k in REPLAYED}


def test_a_run_on_examples_given_in_python_is_recorded_but_not_replayed(tmp_path) -> None:
    pairs = [e for _, e in capital_questions(6)]
    data = Scenario("mine", pairs[:2], pairs[2:], [])
    result = unlearn("tiny:llama", UnlearnConfig(method="graddiff", steps=2), data=data,
                     evaluation=QUICK_EVAL, save=False, seed=3, out=tmp_path / "r",
                     progress=False)  # fmt: skip
    assert result["scenario"] == "mine" and result["training"]["optimizer_steps"] == 2
    config = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert config["data"] == {"given_in_python": [2, 4, 0]} and config["seed"] == 3
    assert config["method"]["seed"] == 3  # the call's seed is the config's
    assert not (tmp_path / "r" / "model").exists()
    with pytest.raises(OptlabError, match="given in Python"):
        rerun(tmp_path / "r", out=tmp_path / "again")
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize(
    "config",
    [UnlearnConfig(method="npo", lora=True, stop_forget_ce=3.0, seed=4),
     EvalConfig(js_mode="sorted", ppl_limit=None), TeachConfig(steps=5, lr=1e-4),
     TeachConfig(full=True, quant_aware="q4_1"),
     UnlearnData(scenario="book"), SweepConfig(("ga", "npo"), (1, 2))],
)  # fmt: skip
def test_unlearn_configs_round_trip_through_yaml(config) -> None:
    data = yaml.safe_load(yaml.safe_dump(config_to_dict(config)))
    assert data["type"].startswith("unlearn") and config_from_dict(data) == config


def test_the_seed_defaults_agree() -> None:
    from optlab.core.job import COMMANDS

    assert UnlearnConfig().seed == COMMANDS.get("unlearn").seed == 0
    assert COMMANDS.get("unlearn sweep").seed == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scenario", "facts", "--forget", "x.jsonl"], "not both"),
        (["--scenario", "facts", "--holdout", "x.jsonl"], "not both"),
        (["--scenario", "fact"], "Did you mean 'facts'"),
        ([], "give --scenario"),
        (["--method", "gd", "--scenario", "facts"], "unlearning method"),
        (["--forget", "missing.jsonl"], "not found"),
        (["--scenario", "facts", "--harm-labels", "labels.txt"], "not found"),
        (["--scenario", "facts", "--steps", "0"], "steps must be a whole number of at least 1"),
        (["--scenario", "facts", "--lr", "inf"], "lr must be a finite number"),
        (["--scenario", "facts", "--eval-limit", "0"], "ppl_limit must be a whole number"),
        (["--scenario", "facts", "--js", "mean"], "invalid choice: 'mean'"),
        (["--scenario", "facts", "--forget-share", "0.9"], "sum below 1"),
        (["--scenario", "facts", "--saliency", "0.5", "--lora"], "does not combine"),
        (["--scenario", "facts", "--saliency", "0"], "saliency is a share"),
        (["--scenario", "facts", "--steps", "two"], "--steps: expected a whole number"),
        # A sweep's flags and foreign ones are refused by the single command.
        (["--scenario", "facts", "--methods", "ga,npo"], "unrecognized arguments: --methods"),
        (["--scenario", "facts", "--sparsity", "0.5"], "unrecognized arguments: --sparsity"),
        (["--scenario", "facts", "tiny:opt"], "unrecognized arguments: tiny:opt"),
    ],
)
def test_cli_errors_exit_2_with_one_line(taught_model, tmp_path, capsys, extra, message) -> None:
    argv = ["unlearn", str(taught_model), "--out", str(tmp_path / "r"), *extra]
    assert cli_code(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("optlab: error:"), err
    assert message in lines[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "ga,gd"], "Did you mean 'ga'"),
        (["--methods", "ga,ga"], "must not repeat"),
        (["--seeds", "1,x"], "--seeds: expected a whole number, got 'x'"),
        (["--no-save"], "unrecognized arguments: --no-save"),
        (["--forget", "missing.jsonl"], "not found"),
    ],
)
def test_cli_sweep_errors_exit_2_with_one_line(tmp_path, capsys, extra, message) -> None:
    data = [] if "--forget" in extra else ["--scenario", "facts"]
    argv = ["unlearn", "sweep", "tiny:llama", "--out", str(tmp_path / "r"), *data, *extra]
    assert cli_code(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("optlab: error:"), err
    assert message in lines[0]
    assert not (tmp_path / "r").exists()


def cli_code(argv: list[str]) -> int:
    """main()'s exit code; argument errors exit from the parser itself."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


def test_the_facts_shares_split_the_countries(taught_model) -> None:
    lm = load_model(str(taught_model))
    known = known_facts(lm, max_new_tokens=12, progress=False, questions=capital_questions(16),
                        cache=False)  # fmt: skip
    countries = len({c for c, _ in known})
    data = UnlearnData(scenario="facts", forget_share=0.5, holdout_share=0.25)
    scenario = data.build(lm, 1, known=known)
    assert len(scenario.forget) == round(0.5 * countries)  # one capital per country here
    assert len(scenario.holdout) == round(0.25 * countries)
    assert len(scenario.retain) == countries - len(scenario.forget) - len(scenario.holdout)
