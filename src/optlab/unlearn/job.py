"""``optlab unlearn`` and ``optlab unlearn sweep``: scenario -> (teach) -> oracle -> unlearn ->
metric suite, written to run directories.

The oracle is the model before the forget data was taught (for ``facts``: the base model,
which learnt the facts in pre-training, so it is an approximation) trained on the retain set
only, with the same budget and parameters as the unlearning run. Every metric is reported for
the unlearned model and, under ``base``, for the model before unlearning.

>>> result = unlearn_to_run("default", UnlearnConfig(method="graddiff", lr=1e-5, steps=50),
...                         out="runs/facts-gd", scenario="facts")
>>> result["FA"], result["base"]["FA"]
(0.05, 1.0)
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from optlab.core.config import config_to_dict
from optlab.core.models import LoadedModel, load_model, save_model
from optlab.core.run import Run, peak_memory_gb, rank_run_path, seed_everything
from optlab.errors import OptlabError
from optlab.unlearn.data import load_examples, save_examples
from optlab.unlearn.harm import HarmClassifier
from optlab.unlearn.metrics import EvalConfig, evaluate_model, memorisation
from optlab.unlearn.scenarios import Scenario, get_scenario, known_facts
from optlab.unlearn.trainer import UnlearnConfig, trained_names, unlearn

log = logging.getLogger("optlab")

RUNS_COLUMNS = ("run_id", "dataset", "seed", "method", "FA", "RA", "MIA", "AD", "JS", "distance")
TEACH = UnlearnConfig(method="finetune", lora=True, lr=1e-3, steps=100, seed=0)


def load_scenario(
    lm: LoadedModel,
    scenario: str | None,
    forget: str | None,
    retain: str | None,
    holdout: str | None = None,
    seed: int = 0,
    **options: Any,
) -> Scenario:
    """A shipped scenario by name, or the user's files (holdout optional)."""
    if scenario is not None:
        if forget or retain:
            raise OptlabError("give either --scenario or --forget/--retain, not both")
        return get_scenario(scenario, lm, seed, **options)
    if not forget:
        raise OptlabError("give --scenario facts|book, or --forget FILE (and --retain FILE)")
    return Scenario(
        "files",
        load_examples(forget),
        load_examples(retain) if retain else [],
        load_examples(holdout) if holdout else [],
    )


def _with_model(lm: LoadedModel, model: Any) -> LoadedModel:
    return LoadedModel(model=model, tokenizer=lm.tokenizer, spec=lm.spec)


def prepare(
    lm: LoadedModel,
    scenario: Scenario,
    config: UnlearnConfig,
    teach: UnlearnConfig = TEACH,
    progress: bool = True,
) -> tuple[LoadedModel, dict[str, Any]]:
    """Teach the forget set when the scenario asks for it (in place) and train the oracle;
    returns the oracle and what was measured on the way (memorisation before teaching)."""
    info: dict[str, Any] = {}
    before = copy.deepcopy(lm.model)  # the model that never saw the forget set
    if scenario.teach:
        info["memorisation_before_teaching"] = memorisation(lm, scenario.forget)
        taught = unlearn(lm, scenario.forget, None, teach, progress=progress)
        info["teaching"] = {k: v for k, v in taught.metrics.items() if k != "losses"}
    oracle = _with_model(lm, before)
    if config.method == "retain_only" or scenario.retain:
        oracle_config = replace(config, method="retain_only", stop_forget_ce=None)
        unlearn(oracle, [], scenario.retain, oracle_config, progress=progress)
    else:
        log.warning("no retain set: the oracle is the model before teaching, untrained")
    return oracle, info


def unlearn_to_run(
    model: str | LoadedModel,
    config: UnlearnConfig,
    out: str | Path,
    *,
    scenario: str | None = None,
    forget: str | None = None,
    retain: str | None = None,
    holdout: str | None = None,
    eval_config: EvalConfig | None = None,
    harm_labels: str | None = None,
    teach: UnlearnConfig = TEACH,
    force: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    save: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """One unlearning run with the whole metric suite, written to ``out``."""
    eval_config = eval_config or EvalConfig()
    lm = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device)
    harm = HarmClassifier.from_jsonl(harm_labels) if harm_labels else None
    data = load_scenario(lm, scenario, forget, retain, holdout, seed=config.seed)
    run_config = {"command": "unlearn", "model": lm.spec, "scenario": data.name,
                  **config_to_dict(config), "eval": config_to_dict(eval_config),
                  "teach": config_to_dict(teach) if data.teach else None}  # fmt: skip
    with Run(rank_run_path(out), config=run_config, seed=config.seed, device=str(lm.device),
             dtype=dtype, force=force) as run:  # fmt: skip
        seed_everything(config.seed)
        for name in ("forget", "retain", "holdout"):
            save_examples(run.dir / f"{name}.jsonl", getattr(data, name))
        oracle, info = prepare(lm, data, config, teach, progress)
        metrics = _measure(lm, oracle, data, config, eval_config, harm, progress)
        metrics |= {"scenario": data.name, **data.info, **info, **_untaught(info)}
        metrics.update(peak_memory_gb())
        run.add_metrics(metrics)
        run.save_text("report.md", report(metrics))
        if save:
            save_model(lm, run.dir / "model")
    return {**metrics, "run": str(run.path)}


def _measure(
    lm: LoadedModel,
    oracle: LoadedModel,
    data: Scenario,
    config: UnlearnConfig,
    eval_config: EvalConfig,
    harm: HarmClassifier | None,
    progress: bool,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Base metrics (unless given), unlearn in place, metrics again."""
    sets = (data.forget, data.retain, data.holdout)
    trained = trained_names(lm.model, config.lora)
    if base is None:
        base = evaluate_model(lm, *sets, eval_config, oracle=oracle.model, harm=harm,
                              trained=trained, progress=progress)  # fmt: skip
    result = unlearn(lm, data.forget, data.retain, config, progress=progress)
    after = evaluate_model(lm, *sets, eval_config, oracle=oracle.model, harm=harm,
                           trained=result.trained, progress=progress)  # fmt: skip
    if base.get("harmful_rate"):  # relative reduction; the base rate is reported beside it
        after["harm_reduction"] = 1 - after["harmful_rate"] / base["harmful_rate"]
    training = {k: v for k, v in result.metrics.items() if k != "losses"}
    return {**after, "train_seconds": result.metrics["train_seconds"], "base": base,
            "training": training, "losses": result.metrics["losses"]}  # fmt: skip


def _untaught(info: dict[str, Any]) -> dict[str, Any]:
    """Memorisation before teaching (book scenario) as flat ``untaught_*`` metrics."""
    before = info.get("memorisation_before_teaching", {})
    return {f"untaught_{k}": v for k, v in before.items()}


def sweep(
    model: str | LoadedModel,
    methods: list[str],
    seeds: list[int],
    out: str | Path,
    *,
    scenario: str = "facts",
    config: UnlearnConfig | None = None,
    eval_config: EvalConfig | None = None,
    scenario_options: dict[str, Any] | None = None,
    teach: UnlearnConfig = TEACH,
    force: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Every method x seed on one scenario; the oracle is trained once per seed. Writes
    ``runs.csv`` (one row per run: ``run_id,dataset,seed,method,FA,RA,MIA,AD,JS,distance``
    then the other metrics, the base model's with a ``base_`` prefix) and one run directory
    (metrics only) per run. ``scenario_options`` go to the scenario (e.g. ``known`` facts)."""
    config = config or UnlearnConfig()
    eval_config = eval_config or EvalConfig()
    for method in methods:
        replace(config, method=method)  # validates the names before any work
    if not methods or not seeds:
        raise OptlabError("the sweep needs at least one method and one seed")
    base_lm = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype,
                                                                       device=device)  # fmt: skip
    options = dict(scenario_options or {})
    if scenario == "facts" and "known" not in options:
        options["known"] = known_facts(base_lm, progress=progress)  # the same for every seed
    run_config = {"command": "unlearn sweep", "model": base_lm.spec, "scenario": scenario,
                  "methods": methods, "seeds": seeds, **config_to_dict(config),
                  "eval": config_to_dict(eval_config),
                  "teach": config_to_dict(teach) if scenario == "book" else None}  # fmt: skip
    rows: list[dict[str, Any]] = []
    with Run(rank_run_path(out), config=run_config, seed=seeds[0], device=str(base_lm.device),
             dtype=dtype, force=force) as run:  # fmt: skip
        for seed in seeds:
            seed_everything(seed)
            data = get_scenario(scenario, base_lm, seed, **options)
            seeded = replace(config, seed=seed)
            taught = _with_model(base_lm, copy.deepcopy(base_lm.model))
            oracle, info = prepare(taught, data, seeded, teach, progress=progress)
            base = evaluate_model(taught, data.forget, data.retain, data.holdout, eval_config,
                                  oracle=oracle.model, progress=progress,
                                  trained=trained_names(taught.model, config.lora))  # fmt: skip
            for method in methods:
                run_id = f"{method}-seed{seed}"
                log.info("sweep: %s", run_id)
                lm = _with_model(taught, copy.deepcopy(taught.model))
                method_config = replace(seeded, method=method)
                metrics = _measure(lm, oracle, data, method_config, eval_config, None, progress,
                                   base=base)  # fmt: skip
                metrics |= _untaught(info)
                with Run(run.dir / run_id, config={**run_config, "method": method, "seed": seed},
                         seed=seed, device=str(lm.device), dtype=dtype) as sub:  # fmt: skip
                    sub.add_metrics({**metrics, "scenario": data.name, **data.info, **info})
                rows.append(runs_row(run_id, data.name, seed, method, metrics))
                run.save_text("runs.csv", runs_csv(rows))  # kept current: a crash keeps rows
                del lm
        summary = {"runs": len(rows), "methods": methods, "seeds": seeds, "rows": rows}
        run.add_metrics(summary)
    return {**summary, "run": str(run.path), "runs_csv": str(run.path / "runs.csv")}


def runs_row(run_id: str, dataset: str, seed: int, method: str, metrics: dict) -> dict[str, Any]:
    """One runs.csv row: the documented columns, then other scalar metrics and base_ ones."""
    row: dict[str, Any] = {"run_id": run_id, "dataset": dataset, "seed": seed, "method": method}
    for key in RUNS_COLUMNS[4:]:
        row[key] = metrics.get(key, math.nan)
    for key, value in metrics.items():
        if key not in row and isinstance(value, int | float) and not isinstance(value, bool):
            row[key] = value
    for key, value in metrics.get("base", {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            row[f"base_{key}"] = value
    return row


def runs_csv(rows: list[dict[str, Any]]) -> str:
    columns = list(RUNS_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def report(metrics: dict[str, Any]) -> str:
    """A Markdown table: each metric before (base) and after unlearning."""
    lines = ["# Unlearning run", "", "| metric | base | unlearned |", "|---|---|---|"]
    base = metrics.get("base", {})
    for key, value in metrics.items():
        if isinstance(value, float):
            before = base.get(key)
            shown = f"{before:.4g}" if isinstance(before, float) else "-"
            lines.append(f"| {key} | {shown} | {value:.4g} |")
    return "\n".join(lines) + "\n"
