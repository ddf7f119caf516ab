"""The unlearning audits: ``audit_reliability``, ``audit_skeb`` and ``audit_graph``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from optlab.api._base import execute_job, job_of, resolve_model
from optlab.audit import reliability, skeb
from optlab.audit.graph import GraphConfig
from optlab.audit.reliability import ReliabilityConfig
from optlab.audit.skeb import SkebConfig
from optlab.core.job import Job, Result
from optlab.core.models import LoadedModel, load_model
from optlab.core.run import Run
from optlab.errors import OptlabError
from optlab.eval.scorer import Scorer

log = logging.getLogger("optlab")


def audit_reliability(
    runs: str | Path,
    config: ReliabilityConfig | None = None,
    *,
    seed: int = 42,
    out: str | Path | None = None,
    force: bool = False,
) -> Result:
    """Do unlearning metrics agree, and which can be trusted (arXiv 2605.02206)? Analyse a
    runs table (``run_id,dataset,seed,method,FA,RA,MIA,AD,JS,distance``, as ``unlearn_sweep``
    writes it): Kendall tau per group and pooled, Spearman reliability against the oracle
    distance, metric weights, the Unified Quality Score per method and its stability.

    >>> result = audit_reliability("tests/audit/data/uqs_paper_runs.csv")
    >>> result["uqs"]["ranking"][0]
    'gradient_ascent'
    """
    config = config or ReliabilityConfig()
    table = reliability.load_runs(runs)  # fails before anything is written
    job = Job("audit reliability", {"runs": str(runs)}, {"audit": config}, seed=seed)

    def body(run: Run | None) -> dict[str, Any]:
        result = reliability.reliability(table, weights=config.weights, trials=config.trials,
                                         seed=seed)  # fmt: skip
        if run is not None:
            reliability.save_reliability(run.dir, result, runs)
        return result

    return execute_job(job, body, out, force)


def audit_skeb(
    model: LoadedModel | str | Path,
    config: SkebConfig | None = None,
    *,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Does persuasion bring "forgotten" facts back (SKeB, arXiv 2510.25732)? Ask each fact
    plainly and in emotional, logical and authority framings, judge every answer against the
    domain graph, and report recall per framing with bootstrap CIs, the recovery against the
    plain question, and OLS of each behaviour on the prompt's entanglement metrics.

    >>> result = audit_skeb(load_model("tiny:llama"), SkebConfig(limit=2, max_new_tokens=4),
    ...                     progress=False)
    >>> result["facts"], sorted(result["models"]["audited"]["framings"])
    (2, ['authority', 'emotional', 'logical', 'plain'])
    """
    from optlab.audit.graph import load_domain
    from optlab.audit.judge import GraphJudge, ModelJudge
    from optlab.audit.probes import TemplateLibrary

    config = config or SkebConfig()
    lm = resolve_model(model, seed=seed)
    graph = load_domain(config.domain)
    facts, probes = skeb.resolve_facts(config, lm.spec, graph)
    library = TemplateLibrary.load(config.templates) if probes is None else None
    device, dtype = str(lm.device), lm.dtype_name

    def load(spec: str) -> LoadedModel:
        return load_model(spec, dtype=dtype, device=device, seed=seed)

    base = load(config.base) if config.base else None
    variants = {v: load(v) for v in config.variants}
    judge = GraphJudge(graph) if config.judge == "graph" else ModelJudge(
        Scorer(load(config.judge), batch_size=config.batch_size, progress=progress))  # fmt: skip
    job = job_of("audit skeb", lm, seed, audit=config)

    def body(run: Run | None) -> dict[str, Any]:
        result, rows = skeb.skeb_audit(
            lm, graph, facts, library=library, probes=probes, judge=judge, base=base,
            variants=variants, seed=seed, prompt_format=config.prompt_template,
            max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
            progress=progress,
        )  # fmt: skip
        if run is not None:
            skeb.save_skeb(run.dir, result, rows, graph)
        return result

    return execute_job(job, body, out, force)


def audit_graph(
    config: GraphConfig, *, out: str | Path | None = None, force: bool = False
) -> Result:
    """Build a domain's co-occurrence graph (node frequency = units naming the entity, edge
    weight = units naming both); with ``out``, save it as JSON for ``SkebConfig(domain=)``.

    >>> audit_graph(GraphConfig(domain="countries"))["nodes"] > 700
    True
    """
    graph = config.build()
    summary = graph.summary()
    if out is None:
        return Result(summary)
    target = Path(out)
    if target.exists():
        if not force:
            raise OptlabError(f"{str(target)!r} exists; pass --force to replace it")
        if target.is_dir() or not _is_graph_file(target):
            raise OptlabError(f"{str(target)!r} is not a domain graph written by optlab: "
                              "choose another --out")  # fmt: skip
    return Result({**summary, "graph": str(graph.save(target))})


def _is_graph_file(path: Path) -> bool:
    from optlab.audit.graph import GRAPH_FORMAT

    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == GRAPH_FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False
