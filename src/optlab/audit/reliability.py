"""Metric reliability over a table of unlearning runs, and the Unified Quality Score (UQS).

Reads the ``runs.csv`` that ``optlab unlearn sweep`` writes (one row per run:
``run_id,dataset,seed,method,FA,RA,MIA,AD,JS,distance``) and answers: do the five metrics
rank methods the same way, which of them track the distance to the oracle model, and which
method is best by a score weighted by each metric's reliability. Steps 1-6 of the UQS paper
(arXiv 2605.02206), reproducing its published numbers from its per-run table:

>>> table = load_runs("runs.csv")
>>> result = reliability(table, weights="full", trials=100, seed=42)
>>> result["uqs"]["ranking"]
['gradient_ascent', 'random_labels', 'salun', 'finetune_retain']
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import stats

from optlab.core.config import configurable, option, require
from optlab.core.data import read_text_file
from optlab.errors import OptlabError

log = logging.getLogger("optlab")

METRICS = ("FA", "RA", "MIA", "AD", "JS")
COLUMNS = ("run_id", "dataset", "seed", "method", *METRICS, "distance")
# Higher is better after flipping: s = -value for these, s = value for RA.
LOWER_IS_BETTER = {"FA", "MIA", "AD", "JS"}
WEIGHT_FLOOR = 0.01
PAIRS = tuple(itertools.combinations(METRICS, 2))


@dataclass(frozen=True)
class RunTable:
    """The runs in table order; ``methods`` in order of first appearance."""

    run_ids: list[str]
    datasets: list[str]
    seeds: list[str]
    methods_per_run: list[str]
    values: dict[str, np.ndarray]  # metric or "distance" -> float array, one entry per run
    methods: list[str]

    def __len__(self) -> int:
        return len(self.run_ids)

    def groups(self) -> list[list[int]]:
        """Row indices per (dataset, seed) group, groups in order of first appearance and rows
        ordered by method order (the order the stable tie rule falls back on)."""
        keyed: dict[tuple[str, str], list[int]] = {}
        for i, key in enumerate(zip(self.datasets, self.seeds, strict=True)):
            keyed.setdefault(key, []).append(i)
        rank = {m: k for k, m in enumerate(self.methods)}
        return [
            sorted(rows, key=lambda i: rank[self.methods_per_run[i]]) for rows in keyed.values()
        ]


def load_runs(path: str | Path) -> RunTable:
    """Read and check a runs table; every problem is an :class:`OptlabError` naming it."""
    path = Path(path)
    text = read_text_file(path, "runs table", encoding="utf-8-sig")  # a spreadsheet's BOM
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise OptlabError(
            f"{path}: missing column(s) {', '.join(missing)}; a runs table needs "
            f"{','.join(COLUMNS)}"
        )
    rows = list(reader)
    return runs_from_rows(rows, source=str(path))


def runs_from_rows(rows: list[dict[str, Any]], source: str = "runs table") -> RunTable:
    """Build a :class:`RunTable` from dicts with the ``COLUMNS`` keys (values as text or
    numbers), checking what the analysis needs."""
    if not rows:
        raise OptlabError(f"{source}: no runs")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise OptlabError(f"{source}: missing column(s) {', '.join(missing)}")
    values: dict[str, list[float]] = {c: [] for c in (*METRICS, "distance")}
    seen: set[tuple[str, str, str]] = set()
    for line, row in enumerate(rows, 2):  # line 1 is the header
        key = (str(row["dataset"]), str(row["seed"]), str(row["method"]))
        if key in seen:
            raise OptlabError(f"{source}, line {line}: a second run of method {key[2]!r} for "
                              f"dataset {key[0]!r}, seed {key[1]}")  # fmt: skip
        seen.add(key)
        for column in values:
            try:
                value = float(row[column])
            except (TypeError, ValueError):
                raise OptlabError(
                    f"{source}, line {line}: {column} = {row[column]!r} is not a number"
                ) from None
            if not math.isfinite(value):
                raise OptlabError(f"{source}, line {line}: {column} is {value}; every metric "
                                  "must be a finite number (re-run or drop that run)")  # fmt: skip
            values[column].append(value)
    methods_per_run = [str(r["method"]) for r in rows]
    table = RunTable(
        run_ids=[str(r["run_id"]) for r in rows],
        datasets=[str(r["dataset"]) for r in rows],
        seeds=[str(r["seed"]) for r in rows],
        methods_per_run=methods_per_run,
        values={c: np.asarray(v, dtype=np.float64) for c, v in values.items()},
        methods=list(dict.fromkeys(methods_per_run)),
    )
    if len(table.methods) < 2:
        raise OptlabError(f"{source}: only one method ({table.methods[0]!r}); comparing "
                          "rankings needs at least two")  # fmt: skip
    usable = [g for g in table.groups() if len(g) >= 2]
    if len(usable) < 2:
        raise OptlabError(
            f"{source}: {len(usable)} (dataset, seed) group(s) with two or more methods; the "
            "per-group t-test needs at least two such groups"
        )
    return table


def scores(table: RunTable, metric: str) -> np.ndarray:
    """The direction-flipped score s: higher is better for every metric."""
    value = table.values[metric]
    return -value if metric in LOWER_IS_BETTER else value


def rank_descending(s: np.ndarray) -> np.ndarray:
    """0 = best. A stable sort: tied values keep their order, which decides the rank vectors
    (and so the taus) of groups where a metric is constant."""
    return np.argsort(np.argsort(-s, kind="stable"), kind="stable")


@contextmanager
def _undefined_is_nan():  # type: ignore[no-untyped-def]
    """Constant inputs make scipy warn and return NaN; we report those values as null."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        yield


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def group_tau(table: RunTable) -> dict[str, dict[str, Any]]:
    """Step 1: per metric pair, the Kendall tau of the two method rankings in each
    (dataset, seed) group; mean over groups and a two-sided one-sample t-test against 0."""
    groups = [g for g in table.groups() if len(g) >= 2]
    out = {}
    for a, b in PAIRS:
        taus = []
        for rows in groups:
            ra = rank_descending(scores(table, a)[rows])
            rb = rank_descending(scores(table, b)[rows])
            taus.append(stats.kendalltau(ra, rb).statistic)
        taus_arr = np.asarray(taus)
        with _undefined_is_nan():  # equal taus in every group: no t statistic
            test = stats.ttest_1samp(taus_arr, 0.0)
        out[f"{a}~{b}"] = {
            "tau": float(taus_arr.mean()),
            "t": _none_if_nan(test.statistic),
            "p": _none_if_nan(test.pvalue),
            "groups": len(taus),
        }
    return out


def pooled_tau(table: RunTable) -> dict[str, Any]:
    """Step 2: Kendall tau-b over all runs on the raw values, per pair (NaN dropped pairwise;
    null where a metric is constant) and the mean over the defined pairs."""
    per_pair = {}
    for a, b in PAIRS:
        x, y = table.values[a], table.values[b]
        keep = np.isfinite(x) & np.isfinite(y)
        with _undefined_is_nan():
            tau = stats.kendalltau(x[keep], y[keep]).statistic if keep.sum() >= 2 else math.nan
        per_pair[f"{a}~{b}"] = _none_if_nan(tau)
    defined = [t for t in per_pair.values() if t is not None]
    return {"pairs": per_pair, "mean": float(np.mean(defined)) if defined else None}


def _spearman(table: RunTable, rows: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
    rows = np.arange(len(table)) if rows is None else rows
    minus_distance = -table.values["distance"][rows]
    out = {}
    for metric in METRICS:
        with _undefined_is_nan():
            result = stats.spearmanr(scores(table, metric)[rows], minus_distance)
        out[metric] = (float(result.statistic), float(result.pvalue))
    return out


def spearman_reliability(table: RunTable) -> dict[str, dict[str, float | None]]:
    """Step 3: Spearman rho between each metric's score s and -distance to the oracle."""
    return {m: {"rho": _none_if_nan(r), "p": _none_if_nan(p)} for m, (r, p) in
            _spearman(table).items()}  # fmt: skip


def normalised_weights(rho: dict[str, float]) -> dict[str, float]:
    """w_m = max(rho_m, 0.01) / sum_k max(rho_k, 0.01); an undefined rho (a constant metric)
    counts as the floor: it carries no evidence of reliability."""
    clipped = {m: WEIGHT_FLOOR if not math.isfinite(r) else max(r, WEIGHT_FLOOR)
               for m, r in rho.items()}  # fmt: skip
    total = sum(clipped.values())
    return {m: c / total for m, c in clipped.items()}


def derive_weights(
    table: RunTable, mode: Literal["full", "cv"] = "full", seed: int = 42
) -> dict[str, float]:
    """Step 4. ``full``: from the rho of step 3 on all runs (the published weights). ``cv``:
    KFold(5, shuffle, random_state=seed) over the runs in table order, rho on each fold's
    training runs, averaged over folds, then clipped and normalised."""
    if mode == "full":
        return normalised_weights({m: r for m, (r, _) in _spearman(table).items()})
    if mode != "cv":
        raise OptlabError(f"unknown weights mode {mode!r}; use full or cv")
    from sklearn.model_selection import KFold

    if len(table) < 5:
        raise OptlabError(f"--weights cv needs at least 5 runs for 5 folds; the table has "
                          f"{len(table)}")  # fmt: skip
    folds = KFold(n_splits=5, shuffle=True, random_state=seed).split(np.arange(len(table)))
    per_fold = [_spearman(table, train) for train, _ in folds]
    mean_rho = {m: float(np.nanmean([f[m][0] for f in per_fold])) if any(
        math.isfinite(f[m][0]) for f in per_fold) else math.nan for m in METRICS}  # fmt: skip
    return normalised_weights(mean_rho)


def method_means(table: RunTable) -> dict[str, dict[str, float]]:
    """Each method's mean of every metric over its runs."""
    by_method = np.asarray(table.methods_per_run)
    return {m: {k: float(table.values[k][by_method == m].mean()) for k in (*METRICS, "distance")}
            for m in table.methods}  # fmt: skip


def uqs(means: dict[str, float], weights: dict[str, float]) -> float:
    """UQS = w_FA (1 - FA) + w_RA RA + w_MIA (1 - MIA) + w_AD / (1 + AD) + w_JS (1 - JS)."""
    return (weights["FA"] * (1 - means["FA"]) + weights["RA"] * means["RA"]
            + weights["MIA"] * (1 - means["MIA"]) + weights["AD"] / (1 + means["AD"])
            + weights["JS"] * (1 - means["JS"]))  # fmt: skip


def uqs_table(table: RunTable, weights: dict[str, float]) -> dict[str, Any]:
    """Step 5: UQS per method on method-level means, and the ranking (best first)."""
    means = method_means(table)
    values = {m: uqs(means[m], weights) for m in table.methods}
    order = np.argsort(-np.asarray(list(values.values())), kind="stable")
    return {"scores": values, "ranking": [table.methods[i] for i in order], "means": means}


def stability(
    table: RunTable, weights: dict[str, float], trials: int = 100, seed: int = 42
) -> dict[str, Any]:
    """Step 6: Kendall tau between the reference UQS ranking and the rankings under ``trials``
    Dirichlet(1,1,1,1,1) weight vectors (in the order FA, RA, MIA, AD, JS), drawn from the
    legacy generator as ``np.random.seed(seed)`` + ``np.random.dirichlet`` would draw them
    (a private ``RandomState``: the same stream without touching the global one)."""
    means = method_means(table)
    reference = rank_descending(np.asarray([uqs(means[m], weights) for m in table.methods]))
    rng = np.random.RandomState(seed)
    taus = []
    for _ in range(trials):
        w = dict(zip(METRICS, rng.dirichlet(np.ones(len(METRICS))), strict=True))
        ranks = rank_descending(np.asarray([uqs(means[m], w) for m in table.methods]))
        taus.append(stats.kendalltau(reference, ranks).statistic)
    taus_arr = np.asarray(taus, dtype=np.float64)
    return {"mean_tau": float(taus_arr.mean()) if trials else None,
            "std_tau": float(taus_arr.std()) if trials else None,  # ddof = 0
            "trials": trials, "seed": seed}  # fmt: skip


def degenerate_columns(table: RunTable) -> list[str]:
    """Columns whose values cannot rank anything (constant, or all missing), each with what
    it does to the result: the numbers stay defined but would mislead without the note."""
    notes = []
    for column in (*METRICS, "distance"):
        values = table.values[column][np.isfinite(table.values[column])]
        if len(values) and not np.all(values == values[0]):
            continue
        state = "has no values" if not len(values) else f"is constant ({values[0]:g})"
        if column == "distance":
            notes.append(f"column distance {state}: every reliability rho is undefined, so "
                         "the UQS weights are all equal and the ranking carries no evidence "
                         "of which metric is reliable")  # fmt: skip
        else:
            notes.append(f"column {column} {state}: its rank correlations are undefined and "
                         "its UQS weight falls to the floor")  # fmt: skip
    return notes


def reliability(
    table: RunTable,
    *,
    weights: Literal["full", "cv"] = "full",
    trials: int = 100,
    seed: int = 42,
) -> dict[str, Any]:
    """All six steps as plain data (every float a Python float, undefined values null)."""
    if trials < 0:
        raise OptlabError(f"--trials must be 0 or more, got {trials}")
    cautions = degenerate_columns(table)
    for caution in cautions:
        log.warning("%s", caution)
    w = derive_weights(table, weights, seed)
    ranked = uqs_table(table, w)
    return {
        "warnings": cautions,
        "runs": len(table),
        "methods": table.methods,
        "groups": len(table.groups()),
        "group_tau": group_tau(table),
        "pooled_tau": pooled_tau(table),
        "spearman": spearman_reliability(table),
        "weights": {"mode": weights, **w},
        "uqs": {"scores": ranked["scores"], "ranking": ranked["ranking"]},
        "method_means": ranked["means"],
        "stability": stability(table, w, trials, seed),
    }


def tau_matrix(group: dict[str, dict[str, Any]]) -> np.ndarray:
    """The 5x5 symmetric matrix of mean group taus (1 on the diagonal)."""
    matrix = np.eye(len(METRICS))
    for (i, a), (j, b) in itertools.combinations(enumerate(METRICS), 2):
        matrix[i, j] = matrix[j, i] = group[f"{a}~{b}"]["tau"]
    return matrix


def reliability_report(result: dict[str, Any], source: str) -> str:
    """A short Markdown report of every statistic."""

    def num(x: float | None, digits: int = 4) -> str:
        return "n/a" if x is None else f"{x:.{digits}g}"

    lines = [
        "# Metric reliability and UQS",
        "",
        f"Runs table `{source}`: {result['runs']} runs, {len(result['methods'])} methods, "
        f"{result['groups']} (dataset, seed) groups.",
        "",
        "## Agreement between metrics (Kendall tau of method rankings)",
        "",
        "| pair | mean group tau | t | p | pooled tau-b |",
        "|---|---|---|---|---|",
    ]
    for pair, g in result["group_tau"].items():
        pooled = result["pooled_tau"]["pairs"][pair]
        lines.append(f"| {pair} | {num(g['tau'])} | {num(g['t'])} | {num(g['p'])} | "
                     f"{num(pooled)} |")  # fmt: skip
    lines += [
        "",
        f"Pooled average tau: {num(result['pooled_tau']['mean'])}.",
        "",
        "## Reliability: Spearman rho with -distance to the oracle, and UQS weights",
        "",
        f"| metric | rho | p | weight ({result['weights']['mode']}) |",
        "|---|---|---|---|",
    ]
    for m in METRICS:
        s = result["spearman"][m]
        lines.append(f"| {m} | {num(s['rho'])} | {num(s['p'])} | "
                     f"{num(result['weights'][m])} |")  # fmt: skip
    lines += ["", "## UQS ranking", "", "| rank | method | UQS |", "|---|---|---|"]
    for k, method in enumerate(result["uqs"]["ranking"], 1):
        lines.append(f"| {k} | {method} | {num(result['uqs']['scores'][method])} |")
    st = result["stability"]
    lines += [
        "",
        f"Stability under {st['trials']} Dirichlet(1) weightings (seed {st['seed']}): Kendall "
        f"tau with the UQS ranking {num(st['mean_tau'])} +- {num(st['std_tau'])}.",
        "",
        "Plots: `tau_heatmap.png`, `rho_bars.png`, `uqs_ranking.png`.",
    ]
    return "\n".join(lines) + "\n"


@configurable("reliability")
@dataclass(frozen=True)
class ReliabilityConfig:
    """How the metric weights are fitted and how often the ranking is re-weighted.

    >>> ReliabilityConfig(weights="cv", trials=200)
    ReliabilityConfig(weights='cv', trials=200)
    """

    weights: str = option("full", "rho on all runs (published) or 5-fold CV",
                          choices=("full", "cv"))  # fmt: skip
    trials: int = option(100, "Dirichlet weightings for the stability check")

    def __post_init__(self) -> None:
        require(self.weights in ("full", "cv"), f"weights must be full or cv, got "
                f"{self.weights!r}")  # fmt: skip
        require(isinstance(self.trials, int) and self.trials >= 0,
                f"--trials must be 0 or more, got {self.trials!r}")  # fmt: skip


def save_reliability(run_dir: Path, result: dict[str, Any], runs_csv: str | Path) -> None:
    """Write a copy of the table, ``report.md`` and the three plots into a staged run."""
    from optlab.audit import plots

    (run_dir / "runs.csv").write_text(read_text_file(runs_csv, "runs table"), "utf-8")
    (run_dir / "report.md").write_text(reliability_report(result, str(runs_csv)), "utf-8")
    (run_dir / "tau_heatmap.png").write_bytes(plots.heatmap(
        tau_matrix(result["group_tau"]), METRICS, "Mean per-group Kendall tau"))  # fmt: skip
    rho = [result["spearman"][m]["rho"] for m in METRICS]
    (run_dir / "rho_bars.png").write_bytes(plots.bars(
        METRICS, [math.nan if r is None else r for r in rho],
        "Reliability: Spearman rho with -distance", "rho"))  # fmt: skip
    ranking = result["uqs"]["ranking"]
    scores = [result["uqs"]["scores"][m] for m in ranking]
    (run_dir / "uqs_ranking.png").write_bytes(plots.bars(ranking, scores, "UQS by method", "UQS"))
