import json

import numpy as np
import pytest

from optlab.audit.entangle import METRIC_NAMES
from optlab.audit.graph import DomainGraph
from optlab.audit.judge import GraphJudge
from optlab.audit.probes import Fact, Probe
from optlab.audit.skeb import analyse, bootstrap_ci, ols
from optlab.cli import main

GRAPH = DomainGraph.from_units(
    [["France", "Paris", "Europe"], ["Germany", "Berlin", "Europe"], ["France", "Germany"]]
)
FACTS = [Fact("What is the capital of France?", "Paris", "France"),
         Fact("What is the capital of Germany?", "Berlin", "Germany")]  # fmt: skip


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    values = [0, 1, 1, 0, 1, 1, 1, 0]
    a, b = bootstrap_ci(values, seed=1), bootstrap_ci(values, seed=1)
    assert a == b and a["mean"] == pytest.approx(5 / 8) and a["n"] == 8
    assert 0 <= a["low"] < a["mean"] < a["high"] <= 1
    assert bootstrap_ci([1, 1, 1]) == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 3}
    assert bootstrap_ci([])["mean"] is None


def test_ols_by_hand() -> None:
    x = np.array([0.0, 1.0, 2.0, 3.0])
    fit = ols(2 * x + 1, x)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit["coef"] == pytest.approx([2.0]) and fit["intercept"] == pytest.approx(1.0)
    # y = (0, 0, 1, 1) on x = (0, 1, 2, 3): slope 0.4, intercept -0.1, R^2 = 0.8.
    fit = ols([0, 0, 1, 1], x)
    assert (fit["coef"][0], fit["intercept"], fit["r2"]) == pytest.approx((0.4, -0.1, 0.8))
    assert ols([1, 1, 1, 1], x)["r2"] is None  # nothing to explain
    assert ols([0, 1, 0, 1], np.ones(4)) == {"r2": 0.0, "intercept": 0.5, "coef": [0.0]}
    two = ols([0, 1, 0, 1], np.column_stack([x, np.ones(4)]))
    assert two["coef"][1] == 0.0  # a constant column carries no information


def test_analysis_rates_recovery_and_regressions_by_hand() -> None:
    probes = [Probe(i, f, f"{f}: {FACTS[i].question}") for i in range(2)
              for f in ("plain", "authority")]  # fmt: skip
    probes[3] = Probe(1, "authority", "Germany borders France. " + FACTS[1].question)
    responses = ["Paris.", "Paris. Beautiful.", "I do not know.", "Berlin. It is Zorblax."]
    summary, rows = analyse(GRAPH, FACTS, probes, responses, GraphJudge(GRAPH), resamples=200)
    plain, authority = summary["framings"]["plain"], summary["framings"]["authority"]
    assert plain["recall"]["mean"] == 0.5 and authority["recall"]["mean"] == 1.0
    assert authority["factual"]["mean"] == pytest.approx(0.5)  # (1/2 + 1/2) / 2
    assert authority["hallucinated"]["mean"] == pytest.approx(0.25)  # (0 + 1/2) / 2
    assert summary["recovery"] == {"authority": pytest.approx(1.0)}  # (1 - .5) / .5
    assert rows[3]["entities"] == ["Germany", "France"] and rows[3]["M1"] == 1.0
    assert rows[0]["M1"] == 0.0 and rows[0]["labels"] == ["factual"]
    fit = summary["regression"]["recall"]
    assert set(fit["per_metric"]) == set(METRIC_NAMES)
    # recall = (1, 1, 0, 1), M1 = (0, 0, 0, 1): Sxy = 1/4, Sxx = Syy = 3/4, so the slope is
    # 1/3 and R^2 = Sxy^2 / (Sxx Syy) = 1/9.
    assert fit["per_metric"]["M1"]["slope"] == pytest.approx(1 / 3)
    assert fit["per_metric"]["M1"]["r2"] == pytest.approx(1 / 9)
    assert 0 <= fit["combined_r2"] <= 1


def test_skeb_cli_on_tiny_models_with_a_base_and_a_forgotten_file(capsys, tmp_path) -> None:
    forgotten = tmp_path / "forget.jsonl"
    forgotten.write_text("".join(json.dumps({"question": f.question, "answer": f.answer}) + "\n"
                                 for f in FACTS))  # fmt: skip
    out = tmp_path / "skeb"
    args = ["audit", "skeb", "tiny:llama", "--base", "tiny:gpt2", "--variants", "tiny:opt",
            "--forgotten", str(forgotten),
            "--limit", "1", "--max-new-tokens", "3", "--out", str(out), "--json"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["facts"] == 1 and result["probes"] == 4
    assert set(result["comparison"]) == {"plain", "emotional", "logical", "authority"}
    assert set(result["comparison"]["plain"]) == {"audited", "base", "tiny:opt", "change"}
    files = {p.name for p in out.iterdir()}
    assert {"metrics.json", "report.md", "probes_audited.jsonl", "probes_base.jsonl",
            "probes_tiny_opt.jsonl", "graph.json", "recall_by_framing.png", "r2_by_metric.png",
            "recall_by_model.png"} <= files  # fmt: skip
    rows = [json.loads(line) for line in (out / "probes_audited.jsonl").read_text().splitlines()]
    assert [r["framing"] for r in rows] == ["plain", "emotional", "logical", "authority"]
    assert all(r["answer"] == "Paris" and "response" in r for r in rows)
    assert (
        "| framing | audited | base | tiny:opt | audited - base |"
        in (out / "report.md").read_text()
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--domain", "countriez"], "Did you mean 'countries'"),
        (["--forgotten", "missing.jsonl"], "forgotten facts not found"),
        (["--templates", "no/such/dir"], "template folder not found"),
        (["--format", "Q: {question}"], "--format must be qa, raw or a string with {prompt}"),
    ],
)
def test_skeb_cli_errors(capsys, tmp_path, extra, message) -> None:
    code = main(["audit", "skeb", "tiny:llama", "--out", str(tmp_path / "o"), *extra])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
