"""The SKeB audit: does persuasive framing bring "forgotten" facts back, and does the
entanglement of the prompt with the domain explain it? (Shah & Le, arXiv 2510.25732.)

Chain: facts -> probes (plain + framings) -> greedy answers (``Scorer.generate``) -> judge
-> per framing: recall, factual / non-factual / hallucinated shares with bootstrap CIs,
relative recovery vs the plain question; OLS of each behaviour on M1-M9 of the prompt;
optionally the same probes on a base model and on variants (e.g. compressed copies of the
unlearned model) for comparison.

>>> result, rows = skeb_audit(load_model("runs/unlearned"), country_graph(), facts[:20])
>>> audited = result["models"]["audited"]
>>> audited["framings"]["authority"]["recall"]["mean"], audited["recovery"]["authority"]
(0.35, 0.4)
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optlab.audit.entangle import METRIC_NAMES, entanglement
from optlab.audit.graph import DomainGraph
from optlab.audit.judge import LABELS, GraphJudge, Judge
from optlab.audit.probes import QA_FORMAT, Fact, Probe, TemplateLibrary, build_probes
from optlab.core.config import configurable, option, require_positive
from optlab.core.models import LoadedModel
from optlab.core.stats import bootstrap_ci
from optlab.errors import OptlabError

log = logging.getLogger("optlab")

BEHAVIOURS = ("recall", *LABELS)


def ols(y: Sequence[float], x: np.ndarray) -> dict[str, Any]:
    """Least squares with an intercept; R^2 = 1 - SS_res / SS_tot (null when y is constant).
    Columns that are constant carry no information: their coefficient is reported as 0."""
    y_arr = np.asarray(y, dtype=np.float64)
    x_arr = np.asarray(x, dtype=np.float64).reshape(len(y_arr), -1)
    design = np.column_stack([np.ones(len(y_arr)), x_arr])
    coef, *_ = np.linalg.lstsq(design, y_arr, rcond=None)  # minimum-norm on rank deficiency
    varying = np.ptp(x_arr, axis=0) > 0 if len(y_arr) else np.zeros(x_arr.shape[1], bool)
    coef[1:][~varying] = 0.0
    coef[0] = y_arr.mean() - x_arr.mean(axis=0) @ coef[1:] if len(y_arr) else 0.0
    residual = y_arr - design @ coef
    total = float(((y_arr - y_arr.mean()) ** 2).sum()) if len(y_arr) else 0.0
    # With an intercept R^2 lies in [0, 1]; clipping removes rounding noise at the ends.
    r2 = min(1.0, max(0.0, 1 - float((residual**2).sum()) / total)) if total > 0 else None
    return {"r2": r2, "intercept": float(coef[0]), "coef": [float(c) for c in coef[1:]]}


def regressions(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per behaviour: OLS on each metric alone (R^2, slope) and on M1-M9 together."""
    x = np.asarray([[r[m] for m in METRIC_NAMES] for r in rows], dtype=np.float64)
    x = x.reshape(len(rows), len(METRIC_NAMES))
    out = {}
    for behaviour in BEHAVIOURS:
        y = [float(r[behaviour]) for r in rows]
        single = {}
        for k, metric in enumerate(METRIC_NAMES):
            fit = ols(y, x[:, k])
            single[metric] = {"r2": fit["r2"], "slope": fit["coef"][0]}
        combined = ols(y, x)
        out[behaviour] = {"per_metric": single, "combined_r2": combined["r2"],
                          "combined_coef": dict(zip(METRIC_NAMES, combined["coef"],
                                                    strict=True))}  # fmt: skip
    return out


def probe_model(
    lm: LoadedModel,
    probes: Sequence[Probe],
    *,
    prompt_format: str = QA_FORMAT,
    max_new_tokens: int = 40,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to every probe, each prompt wrapped in ``prompt_format``."""
    from optlab.eval.scorer import Scorer

    if "{prompt}" not in prompt_format:
        raise OptlabError(f"the prompt format needs a {{prompt}} field: {prompt_format!r}")
    scorer = Scorer(lm, batch_size=batch_size, progress=progress)
    prompts = [prompt_format.format(prompt=p.prompt) for p in probes]
    raw = scorer.generate(prompts, until=["###"], max_new_tokens=max_new_tokens)
    # Models often open with blank lines: cut at the first paragraph break after the text.
    return [text.strip().split("\n\n", 1)[0] for text in raw]


def analyse(
    graph: DomainGraph,
    facts: Sequence[Fact],
    probes: Sequence[Probe],
    responses: Sequence[str],
    judge: Judge,
    *,
    seed: int = 0,
    resamples: int = 1000,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Judge the responses and summarise: (summary, one row per probe)."""
    judgements = judge.judge_all([(facts[p.fact], p.prompt, r) for p, r in
                                  zip(probes, responses, strict=True)])  # fmt: skip
    rows = []
    for probe, response, verdict in zip(probes, responses, judgements, strict=True):
        fact = facts[probe.fact]
        entities = graph.match(probe.prompt)
        rows.append({
            **probe.to_json(), "question": fact.question, "answer": fact.answer,
            "response": response, "labels": verdict.labels, "recall": float(verdict.recall),
            **verdict.shares, "entities": entities,
            **entanglement(graph, entities, target=fact.answer),
        })  # fmt: skip
    framings = list(dict.fromkeys(p.framing for p in probes))
    per_framing = {}
    for framing in framings:
        mine = [r for r in rows if r["framing"] == framing]
        per_framing[framing] = {b: bootstrap_ci([r[b] for r in mine], resamples=resamples,
                                                seed=seed) for b in BEHAVIOURS}  # fmt: skip
    plain = per_framing.get("plain", {}).get("recall", {}).get("mean")
    recovery = {
        f: None if not plain else (per_framing[f]["recall"]["mean"] - plain) / plain
        for f in framings if f != "plain"
    }  # fmt: skip
    summary = {"facts": len(facts), "probes": len(probes), "framings": per_framing,
               "recovery": recovery, "regression": regressions(rows)}  # fmt: skip
    return summary, rows


def skeb_audit(
    lm: LoadedModel,
    graph: DomainGraph,
    facts: Sequence[Fact],
    *,
    library: TemplateLibrary | None = None,
    probes: Sequence[Probe] | None = None,
    judge: Judge | None = None,
    base: LoadedModel | None = None,
    variants: dict[str, LoadedModel] | None = None,
    seed: int = 0,
    prompt_format: str = QA_FORMAT,
    max_new_tokens: int = 40,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Probe ``lm`` (and ``base`` and ``variants`` if given) and analyse; returns (result,
    rows per model)."""
    if not facts:
        raise OptlabError("no facts to probe")
    probes = list(probes) if probes is not None else build_probes(
        facts, library or TemplateLibrary.load(), seed=seed, graph=graph)  # fmt: skip
    judge = judge or GraphJudge(graph)
    clash = {"audited", "base", "change"} & set(variants or {})
    if clash:
        raise OptlabError(f"a variant may not be named {sorted(clash)[0]!r}")
    models = {"audited": lm} | ({"base": base} if base is not None else {}) | (variants or {})
    result: dict[str, Any] = {"models": {}, "probes": len(probes), "facts": len(facts)}
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, model in models.items():
        start = time.perf_counter()
        log.info("probing %s (%s): %d prompts", name, model.spec, len(probes))
        responses = probe_model(model, probes, prompt_format=prompt_format,
                                max_new_tokens=max_new_tokens, batch_size=batch_size,
                                progress=progress)  # fmt: skip
        summary, rows[name] = analyse(graph, facts, probes, responses, judge, seed=seed)
        summary |= {"model": model.spec, "seconds": time.perf_counter() - start}
        result["models"][name] = summary
    if len(models) > 1:
        result["comparison"] = compare(result["models"])
    return result, rows


def compare(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Recall per framing for every model probed; ``change`` = audited - base when both."""
    out = {}
    for framing in summaries["audited"]["framings"]:
        recall = {name: s["framings"].get(framing, {}).get("recall", {}).get("mean")
                  for name, s in summaries.items()}  # fmt: skip
        a, b = recall["audited"], recall.get("base")
        out[framing] = recall | {"change": None if a is None or b is None else a - b}
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def skeb_report(result: dict[str, Any]) -> str:
    """Markdown: per-framing table per model, recovery, comparison, regression R^2."""
    lines = ["# SKeB persuasion audit", "",
             f"{result['facts']} facts, {result['probes']} prompts per model.", ""]  # fmt: skip
    for name, summary in result["models"].items():
        lines += [f"## {name}: `{summary['model']}`", "",
                  "| framing | recall (95% CI) | factual | non-factual | hallucinated | "
                  "recovery vs plain |", "|---|---|---|---|---|---|"]  # fmt: skip
        for framing, s in summary["framings"].items():
            r = s["recall"]
            recovery = summary["recovery"].get(framing)
            lines.append(
                f"| {framing} | {_pct(r['mean'])} ({_pct(r['low'])}-{_pct(r['high'])}) | "
                f"{_pct(s['factual']['mean'])} | {_pct(s['non-factual']['mean'])} | "
                f"{_pct(s['hallucinated']['mean'])} | "
                f"{'-' if framing == 'plain' else _pct(recovery)} |"
            )
        lines += ["", "OLS of each behaviour on the prompt's entanglement metrics (R^2):", "",
                  "| behaviour | " + " | ".join(METRIC_NAMES) + " | all |",
                  "|---" * (len(METRIC_NAMES) + 2) + "|"]  # fmt: skip
        for behaviour, fit in summary["regression"].items():
            cells = [_num(fit["per_metric"][m]["r2"]) for m in METRIC_NAMES]
            lines.append(f"| {behaviour} | {' | '.join(cells)} | {_num(fit['combined_r2'])} |")
        lines.append("")
    if "comparison" in result:
        names = list(result["models"])
        lines += ["## Recall per framing, model by model", "",
                  "| framing | " + " | ".join(names) + " | audited - base |",
                  "|---" * (len(names) + 2) + "|"]  # fmt: skip
        for framing, c in result["comparison"].items():
            change = "n/a" if c["change"] is None else f"{100 * c['change']:+.1f} pt"
            cells = " | ".join(_pct(c[n]) for n in names)
            lines.append(f"| {framing} | {cells} | {change} |")
        lines.append("")
    lines.append("Plots: `recall_by_framing.png`, `r2_by_metric.png`"
                 + (", `recall_by_model.png`." if "comparison" in result else "."))  # fmt: skip
    return "\n".join(lines) + "\n"


@configurable("skeb")
@dataclass(frozen=True)
class SkebConfig:
    """What to probe and how. Facts come from ``prompts``, else ``forgotten``, else the
    audited run's own ``forget.jsonl``, else the domain's capital questions.

    >>> SkebConfig(limit=20, base="default").prompt_template
    '### Question: {prompt}\\n ### Answer:'
    """

    domain: str = option("countries", "countries, or a graph .json written by optlab")
    forgotten: str | None = option(None, "unlearning run (its forget.jsonl) or .jsonl of "
                                   "question/answer", metavar="RUN_OR_FILE")  # fmt: skip
    prompts: str | None = option(None, "prompts written elsewhere: question, answer, framing, "
                                 "prompt", metavar="FILE.jsonl")  # fmt: skip
    templates: str | None = option(None, "extra or replacement framing files", metavar="DIR")
    limit: int | None = option(None, "probe only the first N facts")
    base: str | None = option(None, "also probe this model and compare", metavar="MODEL")
    variants: tuple[str, ...] = option((), "also probe these (e.g. compressed copies of the "
                                       "unlearned model)", metavar="M1,M2")  # fmt: skip
    judge: str = option("graph", "graph, or a judge MODEL")
    prompt_format: str = option("qa", "qa ('### Question: ...\\n ### Answer:', as unlearning "
                                "trains), raw, or a string with {prompt}",
                                flag="--format")  # fmt: skip
    max_new_tokens: int = option(40, "tokens generated per answer")
    batch_size: int = option(8, "prompts per forward pass")

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(v for v in self.variants if v))
        require_positive(self, "limit", "max_new_tokens", "batch_size")
        if self.prompts and (self.forgotten or self.templates):
            raise OptlabError("--prompts brings its own facts and framings; drop --forgotten "
                              "and --templates")  # fmt: skip
        if "{prompt}" not in self.prompt_template:
            raise OptlabError(f"--format must be qa, raw or a string with {{prompt}}, got "
                              f"{self.prompt_format!r}")  # fmt: skip
        try:  # other fields or stray braces would fail only once every model has loaded
            self.prompt_template.format(prompt="")
        except (KeyError, IndexError, ValueError) as err:
            raise OptlabError(
                f"--format {self.prompt_format!r} is not a valid template ({err}): only "
                "{prompt} may stand in braces; write {{ and }} for literal ones"
            ) from None

    @property
    def prompt_template(self) -> str:
        return {"qa": QA_FORMAT, "raw": "{prompt}"}.get(self.prompt_format, self.prompt_format)


def resolve_facts(
    config: SkebConfig, model: str, graph: DomainGraph
) -> tuple[list[Fact], list[Probe] | None]:
    """The facts to probe (and, with ``prompts``, the probes themselves)."""
    from optlab.audit.probes import country_facts, load_facts, load_prompts

    probes = None
    if config.prompts:
        facts, probes = load_prompts(config.prompts)
    elif config.forgotten:
        facts = load_facts(config.forgotten, graph)
    elif (Path(model) / "forget.jsonl").is_file():
        facts = load_facts(model, graph)
    elif config.domain == "countries":
        facts = country_facts()
    else:
        raise OptlabError(f"domain {config.domain!r} has no built-in facts: pass --forgotten "
                          "FILE or --prompts FILE")  # fmt: skip
    if config.limit is not None:
        facts = facts[: config.limit]
        probes = None if probes is None else [p for p in probes if p.fact < config.limit]
    return list(facts), probes


def save_skeb(
    run_dir: Path,
    result: dict[str, Any],
    rows: dict[str, list[dict[str, Any]]],
    graph: DomainGraph,
) -> None:
    """Write ``probes_*.jsonl`` (every prompt, response, labels and metrics), the graph,
    ``report.md`` and the plots into a staged run directory."""
    import json

    from optlab.audit import plots

    for name, model_rows in rows.items():
        safe = re.sub(r"[^\w.-]+", "_", name)  # a model spec may hold / or :
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in model_rows)
        (run_dir / f"probes_{safe}.jsonl").write_text(lines, encoding="utf-8")
    graph.save(run_dir / "graph.json")
    (run_dir / "report.md").write_text(skeb_report(result), encoding="utf-8")
    audited = result["models"]["audited"]
    framings = list(audited["framings"])
    recall = [audited["framings"][f]["recall"] for f in framings]
    (run_dir / "recall_by_framing.png").write_bytes(plots.bars(
        framings, [r["mean"] for r in recall], "Recall of the forgotten fact by framing",
        "recall", errors=[(r["low"], r["high"]) for r in recall]))  # fmt: skip
    r2 = audited["regression"]["recall"]["per_metric"]
    (run_dir / "r2_by_metric.png").write_bytes(plots.bars(
        METRIC_NAMES, [math.nan if r2[m]["r2"] is None else r2[m]["r2"] for m in
                       METRIC_NAMES], "Recall ~ metric: R^2", "R^2"))  # fmt: skip
    if "comparison" in result:
        comp = result["comparison"]
        (run_dir / "recall_by_model.png").write_bytes(plots.grouped_bars(
            framings, {n: [comp[f][n] for f in framings] for n in result["models"]},
            "Recall by framing", "recall"))  # fmt: skip
