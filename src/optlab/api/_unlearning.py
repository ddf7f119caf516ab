"""Unlearning: ``unlearn`` and ``unlearn_sweep``."""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from optlab.api._base import data_record, execute_job, job_of, resolve_model
from optlab.core.job import Result
from optlab.core.models import LoadedModel, save_model
from optlab.core.run import Run, peak_memory_gb, seed_everything
from optlab.errors import OptlabError
from optlab.unlearning import job as unlearn_job
from optlab.unlearning.data import save_examples
from optlab.unlearning.metrics import EvalConfig
from optlab.unlearning.scenarios import Scenario, UnlearnData, known_facts
from optlab.unlearning.trainer import TeachConfig, UnlearnConfig

log = logging.getLogger("optlab")


def unlearn(
    model: LoadedModel | str | Path,
    config: UnlearnConfig | None = None,
    *,
    data: UnlearnData | Scenario,
    evaluation: EvalConfig | None = None,
    teach: TeachConfig | None = None,
    save: bool = True,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Unlearn ``data``'s forget set from ``model`` in place (``config.method``: ``ga``,
    ``ga_kl_rand``, ``graddiff``, ``npo``, ``retain_only``), after teaching it first when the
    scenario asks (``book``: ``teach``), and measure the suite (``evaluation``) on the model
    before and after: FA, RA, MIA, AD, JS, distance to the oracle (the same budget on the
    retain set only), attack AUCs, perplexity. ``data`` is an :class:`UnlearnData` spec (a
    shipped scenario or your files) or a :class:`Scenario` of examples. With ``out``, write a
    run: metrics, ``report.md``, the data sets (``forget.jsonl``, ... for ``optlab eval
    --tasks unlearn:RUN``) and, with ``save``, the model.

    >>> facts = [Example(a, f"What is the capital of {c}?") for c, a in [("France", "Paris"),
    ...          ("Italy", "Rome"), ("Spain", "Madrid"), ("Peru", "Lima")]]
    >>> result = unlearn(load_model("tiny:llama"), UnlearnConfig(method="graddiff", steps=2),
    ...                  data=Scenario("capitals", facts[:2], facts[2:], []),
    ...                  evaluation=EvalConfig(max_new_tokens=4, ppl_seq_len=32, ppl_limit=1),
    ...                  progress=False)
    >>> result["training"]["optimizer_steps"], sorted(result["base"])[:3]
    (2, ['AD', 'FA', 'JS'])
    """
    config = replace(config or UnlearnConfig(), seed=seed)  # the call's seed is the config's
    evaluation = evaluation or EvalConfig()
    teach = teach or TeachConfig()
    lm = resolve_model(model)
    unlearn_job.preflight(lm, config, evaluation, teach)
    job = job_of("unlearn", lm, seed, method=config, data=data_record(data), teach=teach,
               eval=evaluation, output=unlearn_job.UnlearnOutput(save))  # fmt: skip

    def body(run: Run | None) -> dict[str, Any]:
        scenario = data.build(lm, seed) if isinstance(data, UnlearnData) else data
        harm = data.harm_classifier() if isinstance(data, UnlearnData) else None
        if run is not None:
            for name in ("forget", "retain", "holdout"):
                save_examples(run.dir / f"{name}.jsonl", getattr(scenario, name))
        oracle, info = unlearn_job.prepare(lm, scenario, config, teach, progress)
        metrics = unlearn_job.measure(lm, oracle, scenario, config, evaluation, harm, progress)
        metrics |= {"scenario": scenario.name, **scenario.info, **info,
                    **unlearn_job.untaught(info)}  # fmt: skip
        metrics.update(peak_memory_gb())
        if run is not None:
            run.save_text("report.md", unlearn_job.report(metrics))
            if save:
                save_model(lm, run.dir / "model")
        return metrics

    return execute_job(job, body, out, force)


def unlearn_sweep(
    model: LoadedModel | str | Path,
    methods: list[str] | tuple[str, ...],
    seeds: list[int] | tuple[int, ...],
    *,
    data: UnlearnData | Scenario,
    config: UnlearnConfig | None = None,
    evaluation: EvalConfig | None = None,
    teach: TeachConfig | None = None,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Every method x seed on the same data a single :func:`unlearn` takes (a shipped
    scenario is split anew for each seed; files and a :class:`Scenario` are the same for
    every seed, the seed then varies the training). Per seed, the forget set is taught when
    the scenario asks, the oracle trained once and the base model measured once; each method
    starts from a copy. With ``out``, write ``runs.csv`` (``run_id,dataset,seed,method,FA,RA,
    MIA,AD,JS,distance``, then the other metrics and the base model's as ``base_*``: the input
    of ``optlab audit reliability``) and one run directory per method and seed, whose
    ``config.yaml`` is the single ``unlearn`` job that replays it.

    >>> facts = [Example(a, f"What is the capital of {c}?") for c, a in [("France", "Paris"),
    ...          ("Italy", "Rome"), ("Spain", "Madrid"), ("Peru", "Lima")]]
    >>> result = unlearn_sweep("tiny:llama", ["ga", "retain_only"], [1, 2],
    ...                        data=Scenario("capitals", facts[:2], facts[2:], []),
    ...                        config=UnlearnConfig(steps=2),
    ...                        evaluation=EvalConfig(max_new_tokens=4, ppl_seq_len=32,
    ...                                              ppl_limit=1), progress=False)
    >>> [row["run_id"] for row in result["rows"]]
    ['ga-seed1', 'retain_only-seed1', 'ga-seed2', 'retain_only-seed2']
    """
    config = config or UnlearnConfig()
    evaluation = evaluation or EvalConfig()
    teach = teach or TeachConfig()
    grid = unlearn_job.SweepConfig(tuple(methods), tuple(seeds))
    if not grid.methods or not grid.seeds:
        raise OptlabError("the sweep needs at least one method and one seed")
    base_lm = resolve_model(model)
    unlearn_job.preflight(base_lm, config, evaluation, teach)
    recorded = data_record(data)
    job = job_of("unlearn sweep", base_lm, grid.seeds[0], method=config, sweep=grid,
               data=recorded, teach=teach, eval=evaluation)  # fmt: skip

    def body(run: Run | None) -> dict[str, Any]:
        harm = data.harm_classifier() if isinstance(data, UnlearnData) else None
        options: dict[str, Any] = {}
        if isinstance(data, UnlearnData) and data.scenario == "facts":
            options["known"] = known_facts(base_lm, progress=progress)  # the same for every seed
        rows: list[dict[str, Any]] = []
        for seed in grid.seeds:
            seed_everything(seed)
            scenario = data.build(base_lm, seed, **options) if isinstance(data, UnlearnData) \
                else data  # fmt: skip
            seeded = replace(config, seed=seed)
            taught = unlearn_job.with_model(base_lm, copy.deepcopy(base_lm.model))
            oracle, info = unlearn_job.prepare(taught, scenario, seeded, teach, progress)
            base = unlearn_job.base_metrics(taught, oracle, scenario, seeded, evaluation, harm,
                                           progress)  # fmt: skip
            for method in grid.methods:
                run_id = f"{method}-seed{seed}"
                log.info("sweep: %s", run_id)
                lm = unlearn_job.with_model(taught, copy.deepcopy(taught.model))
                method_config = replace(seeded, method=method)
                metrics = unlearn_job.measure(lm, oracle, scenario, method_config, evaluation,
                                             harm, progress, base=base)  # fmt: skip
                metrics |= unlearn_job.untaught(info)
                rows.append(unlearn_job.runs_row(run_id, scenario.name, seed, method, metrics))
                if run is not None:  # each run is the single unlearn job that replays it
                    single = job_of("unlearn", base_lm, seed, method=method_config,
                                  data=recorded, teach=teach, eval=evaluation,
                                  output=unlearn_job.UnlearnOutput(save=False))  # fmt: skip
                    with Run(run.dir / run_id, config=single.to_dict(), seed=seed,
                             device=job.device, dtype=job.dtype) as sub:  # fmt: skip
                        sub.add_metrics({**metrics, "scenario": scenario.name, **scenario.info,
                                         **info})  # fmt: skip
                    run.save_text("runs.csv", unlearn_job.runs_csv(rows))  # a crash keeps rows
                del lm
        return {"runs": len(rows), "methods": list(grid.methods), "seeds": list(grid.seeds),
                "rows": rows}  # fmt: skip

    result = execute_job(job, body, out, force)
    if result.run is not None:
        result.metrics["runs_csv"] = str(result.run / "runs.csv")
    return result
