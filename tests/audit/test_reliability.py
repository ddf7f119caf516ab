import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from optlab.audit.reliability import (
    COLUMNS,
    METRICS,
    group_tau,
    load_runs,
    normalised_weights,
    pooled_tau,
    rank_descending,
    reliability,
    runs_from_rows,
    stability,
    uqs,
)
from optlab.cli import main
from optlab.errors import OptlabError

PAPER = Path(__file__).parent / "data" / "uqs_paper_runs.csv"


def test_reproduces_the_published_analysis_to_its_printed_digits() -> None:
    result = reliability(load_runs(PAPER), weights="full", trials=100, seed=42)
    tau = result["group_tau"]
    assert round(tau["FA~AD"]["tau"], 3) == -0.259 and round(tau["FA~AD"]["p"], 3) == 0.043
    assert round(tau["FA~RA"]["tau"], 3) == 0.852
    assert round(tau["AD~JS"]["tau"], 3) == 0.444
    assert round(result["pooled_tau"]["mean"], 4) == 0.0861
    rho = {m: s["rho"] for m, s in result["spearman"].items()}
    assert [round(rho[m], 3) for m in METRICS] == [-0.418, 0.484, 0.224, -0.215, -0.051]
    assert round(result["spearman"]["RA"]["p"], 4) == 0.0028
    assert round(result["spearman"]["FA"]["p"], 3) == 0.011
    w = result["weights"]
    assert (round(w["RA"], 4), round(w["MIA"], 4)) == (0.6557, 0.3037)
    assert [round(w[m], 5) for m in ("FA", "AD", "JS")] == [0.01356] * 3
    scores = {m: round(v, 4) for m, v in result["uqs"]["scores"].items()}
    assert scores == {"gradient_ascent": 0.6448, "random_labels": 0.6306, "salun": 0.6173,
                      "finetune_retain": 0.5957}  # fmt: skip
    assert result["uqs"]["ranking"] == ["gradient_ascent", "random_labels", "salun",
                                        "finetune_retain"]  # fmt: skip
    st = result["stability"]
    assert (round(st["mean_tau"], 4), round(st["std_tau"], 4)) == (0.6467, 0.2617)


def row(method, dataset, fa, ra, mia, ad, js, dist, seed=1):
    return dict(run_id=f"{dataset}-{method}", dataset=dataset, seed=seed, method=method,
                FA=fa, RA=ra, MIA=mia, AD=ad, JS=js, distance=dist)  # fmt: skip


# Group d1: FA ties A and B; group d2 lists C first and FA is constant.
SMALL = [
    row("A", "d1", 0.5, 0.8, 0.3, 1.0, 0.1, 0.1),
    row("B", "d1", 0.5, 0.6, 0.2, 2.0, 0.3, 0.2),
    row("C", "d1", 0.2, 0.7, 0.4, 3.0, 0.2, 0.3),
    row("C", "d2", 0.4, 0.9, 0.1, 0.0, 0.5, 0.9),
    row("A", "d2", 0.4, 0.1, 0.3, 1.0, 0.1, 0.3),
    row("B", "d2", 0.4, 0.5, 0.6, 3.0, 0.3, 0.1),
]


def test_group_tau_by_hand_with_the_stable_tie_rule() -> None:
    table = runs_from_rows(SMALL)
    assert table.methods == ["A", "B", "C"]  # order of first appearance
    # d1: FA ranks (A,B,C) = [1,2,0] (A before B: tie keeps table order), RA = [0,2,1]:
    # pairs AB concordant, AC discordant, BC concordant -> 1/3.
    # d2 in method order A,B,C: FA constant -> [0,1,2]; RA (.1,.5,.9) -> [2,1,0] -> tau -1.
    tau = group_tau(table)["FA~RA"]
    assert tau["tau"] == pytest.approx((1 / 3 - 1) / 2)
    # t = mean / (sd / sqrt 2) = -0.5 with one degree of freedom (Cauchy): p = 1 - 2 atan(.5)/pi
    assert tau["t"] == pytest.approx(-0.5)
    assert tau["p"] == pytest.approx(1 - 2 * math.atan(0.5) / math.pi)
    assert tau["groups"] == 2


def test_rank_descending_is_stable_on_ties() -> None:
    assert rank_descending(np.array([0.0, 0.0, 1.0, 0.0])).tolist() == [1, 2, 0, 3]


def test_pooled_tau_and_spearman_against_scipy_on_raw_and_flipped_values() -> None:
    rows = [dict(r) for r in SMALL]
    for r in rows:
        r["MIA"] = 0.5  # a constant metric: tau undefined, left out of the mean
    table = runs_from_rows(rows)
    pooled = pooled_tau(table)
    column = {m: [r[m] for r in rows] for m in METRICS}
    expected = stats.kendalltau(column["FA"], column["AD"]).statistic
    assert pooled["pairs"]["FA~AD"] == pytest.approx(expected)
    assert pooled["pairs"]["FA~MIA"] is None
    defined = [t for t in pooled["pairs"].values() if t is not None]
    assert len(defined) == 6 and pooled["mean"] == pytest.approx(np.mean(defined))
    result = reliability(table, trials=0)
    rho = stats.spearmanr([-r["FA"] for r in rows], [-r["distance"] for r in rows]).statistic
    assert result["spearman"]["FA"]["rho"] == pytest.approx(rho)
    assert result["spearman"]["MIA"]["rho"] is None
    assert result["weights"]["MIA"] == pytest.approx(0.01 / sum(
        max(result["spearman"][m]["rho"] or 0.01, 0.01) for m in METRICS))  # fmt: skip


def test_weights_clip_at_one_hundredth_and_sum_to_one() -> None:
    w = normalised_weights({"FA": -0.4, "RA": 0.5, "MIA": 0.2, "AD": math.nan, "JS": 0.01})
    assert w == pytest.approx({"FA": 0.01 / 0.73, "RA": 0.5 / 0.73, "MIA": 0.2 / 0.73,
                               "AD": 0.01 / 0.73, "JS": 0.01 / 0.73})  # fmt: skip


def test_uqs_by_hand_and_ranking_on_method_means() -> None:
    means = {"FA": 0.2, "RA": 0.7, "MIA": 0.4, "AD": 3.0, "JS": 0.5}
    w = {"FA": 0.1, "RA": 0.2, "MIA": 0.3, "AD": 0.25, "JS": 0.15}
    assert uqs(means, w) == pytest.approx(0.1 * 0.8 + 0.2 * 0.7 + 0.3 * 0.6 + 0.25 / 4 + 0.075)
    equal = dict.fromkeys(METRICS, 0.2)
    table = runs_from_rows(SMALL)
    result = reliability(table, trials=0)
    # Method A: means FA .45, RA .45, MIA .3, AD 1, JS .1 -> UQS with the derived weights.
    a = {"FA": 0.45, "RA": 0.45, "MIA": 0.3, "AD": 1.0, "JS": 0.1}
    weights = {m: result["weights"][m] for m in METRICS}
    assert result["uqs"]["scores"]["A"] == pytest.approx(uqs(a, weights))
    assert uqs(a, equal) == pytest.approx(0.2 * (0.55 + 0.45 + 0.7 + 0.5 + 0.9))
    scores = result["uqs"]["scores"]
    assert result["uqs"]["ranking"] == sorted(scores, key=lambda m: -scores[m])


def test_stability_draws_the_legacy_global_stream() -> None:
    table = runs_from_rows(SMALL)
    weights = dict.fromkeys(METRICS, 0.2)
    state = np.random.get_state()
    result = stability(table, weights, trials=3, seed=7)
    assert np.all(np.random.get_state()[1] == state[1])  # the global generator is untouched
    np.random.seed(7)
    means = {m: {k: np.mean([r[k] for r in SMALL if r["method"] == m]) for k in METRICS}
             for m in "ABC"}  # fmt: skip
    reference = rank_descending(np.array([uqs(means[m], weights) for m in "ABC"]))
    taus = []
    for _ in range(3):
        w = dict(zip(METRICS, np.random.dirichlet(np.ones(5)), strict=True))
        ranks = rank_descending(np.array([uqs(means[m], w) for m in "ABC"]))
        taus.append(stats.kendalltau(reference, ranks).statistic)
    assert result["mean_tau"] == pytest.approx(np.mean(taus))
    assert result["std_tau"] == pytest.approx(np.std(taus))


def test_cv_weights_are_a_distribution_and_follow_the_seed() -> None:
    table = load_runs(PAPER)
    a = reliability(table, weights="cv", trials=0, seed=42)["weights"]
    b = reliability(table, weights="cv", trials=0, seed=42)["weights"]
    c = reliability(table, weights="cv", trials=0, seed=1)["weights"]
    assert a == b and a != c
    assert sum(a[m] for m in METRICS) == pytest.approx(1.0)
    assert min(a[m] for m in METRICS) > 0 and a["RA"] == max(a[m] for m in METRICS)


def write_csv(path: Path, rows: list[dict], columns=COLUMNS) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: (rows, [c for c in COLUMNS if c != "JS"]), "missing column(s) JS"),
        (lambda rows: ([rows[0], rows[4]], COLUMNS), "only one method ('A')"),
        (lambda rows: ([dict(rows[0], AD="nan"), *rows[1:]], COLUMNS), "AD is nan"),
        (lambda rows: ([dict(rows[0], RA="high"), *rows[1:]], COLUMNS), "is not a number"),
        (lambda rows: (rows[:3], COLUMNS), "needs at least two such groups"),
        (lambda rows: ([*rows, rows[0]], COLUMNS), "a second run of method 'A'"),
        (lambda rows: ([], COLUMNS), "no runs"),
    ],
)
def test_bad_tables_are_one_clear_error_line(capsys, tmp_path, edit, message) -> None:
    rows, columns = edit([dict(r) for r in SMALL])
    path = write_csv(tmp_path / "runs.csv", rows, columns)
    with pytest.raises(OptlabError, match=None):
        load_runs(path)
    code = main(["audit", "reliability", str(path), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_writes_report_plots_and_refuses_to_overwrite(capsys, tmp_path) -> None:
    out = tmp_path / "rel"
    args = ["audit", "reliability", str(PAPER), "--out", str(out), "--trials", "10", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["uqs"]["ranking"][0] == "gradient_ascent" and result["stability"]["trials"] == 10
    files = {p.name for p in out.iterdir()}
    assert {"metrics.json", "report.md", "tau_heatmap.png", "rho_bars.png", "uqs_ranking.png",
            "runs.csv", "config.yaml"} <= files  # fmt: skip
    assert "| 1 | gradient_ascent | 0.6448 |" in (out / "report.md").read_text()
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err


def test_degenerate_columns_are_named_with_what_they_do(caplog) -> None:
    rows = [row(m, d, fa, 0.5, 0.1 * fa, 0.2 * fa, fa, 1.0) for d in ("d1", "d2")
            for m, fa in (("ga", 0.1), ("npo", 0.2), ("oracle", 0.3))]  # fmt: skip
    result = reliability(runs_from_rows(rows), trials=2)
    assert any("distance is constant (1)" in w and "weights are all equal" in w
               for w in result["warnings"])  # fmt: skip
    assert any(w.startswith("column RA is constant") for w in result["warnings"])
    assert not any(w.startswith("column FA") for w in result["warnings"])  # FA varies
    assert "ranking carries no evidence" in caplog.text
    assert reliability(runs_from_rows(SMALL), trials=2)["warnings"] == []
