"""The pieces of ``optlab unlearn`` and ``optlab unlearn sweep`` (:func:`optlab.api.unlearn`,
:func:`optlab.api.unlearn_sweep`): scenario -> (teach) -> oracle -> unlearn -> metric suite.

The oracle is the model before the forget data was taught (for ``facts``: the base model,
which learnt the facts in pre-training, so it is an approximation) trained on the retain set
only, with the same budget and parameters as the unlearning run. Every metric is reported for
the unlearned model and, under ``base``, for the model before unlearning.

>>> oracle, info = prepare(lm, scenario, UnlearnConfig(method="graddiff"), TeachConfig())
>>> measure(lm, oracle, scenario, UnlearnConfig(method="graddiff"), EvalConfig(), None, False)
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
from dataclasses import dataclass, replace
from typing import Any

from optlab.core.config import configurable, option, require
from optlab.core.models import LoadedModel
from optlab.unlearning.harm import HarmClassifier
from optlab.unlearning.losses import LOSSES
from optlab.unlearning.metrics import EvalConfig, evaluate_model, memorisation
from optlab.unlearning.scenarios import Scenario
from optlab.unlearning.trainer import (
    TeachConfig,
    UnlearnConfig,
    grid_modules,
    trained_names,
    unlearn,
)

log = logging.getLogger("optlab")

RUNS_COLUMNS = ("run_id", "dataset", "seed", "method", "FA", "RA", "MIA", "AD", "JS", "distance")


@configurable("unlearn-output")
@dataclass(frozen=True)
class UnlearnOutput:
    """What a run keeps besides its metrics and data sets."""

    save: bool = option(True, "do not save the model", flag="--no-save")


@configurable("unlearn-sweep")
@dataclass(frozen=True)
class SweepConfig:
    """The grid of a sweep: every method x seed (empty: the command's --method / --seed)."""

    methods: tuple[str, ...] = option((), "comma-separated methods (default: --method)",
                                      metavar="M1,M2")  # fmt: skip
    seeds: tuple[int, ...] = option((), "comma-separated seeds (default: --seed)",
                                    metavar="S1,S2")  # fmt: skip

    def __post_init__(self) -> None:
        for method in self.methods:
            LOSSES.get(method)  # did-you-mean before any work
        require(all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds),
                f"seeds must be whole numbers, got {list(self.seeds)}")  # fmt: skip
        require(len(set(self.methods)) == len(self.methods) and
                len(set(self.seeds)) == len(self.seeds),
                "a sweep's methods and seeds must not repeat (run ids would collide)")  # fmt: skip


def with_model(lm: LoadedModel, model: Any) -> LoadedModel:
    """``lm`` with other weights (a copy, the oracle): same tokenizer, spec and seed."""
    return replace(lm, model=model)


def preflight(
    lm: LoadedModel, config: UnlearnConfig, evaluation: EvalConfig, teach: TeachConfig
) -> None:
    """What can fail before any work, checked before any: an evaluation window beyond the
    model's context, and a ``quant_aware`` grid (of the unlearning or of the teaching) on
    rows that are not whole GGUF blocks."""
    evaluation.window(lm)
    for flag, grid in (("--teach-quant-aware", teach.quant_aware),
                       ("--quant-aware", config.quant_aware)):  # fmt: skip
        if grid is not None:
            grid_modules(lm.model, grid, flag)


def prepare(
    lm: LoadedModel,
    scenario: Scenario,
    config: UnlearnConfig,
    teach: TeachConfig,
    progress: bool = True,
) -> tuple[LoadedModel, dict[str, Any]]:
    """Teach the forget set when the scenario asks for it (in place) and train the oracle;
    returns the oracle and what was measured on the way (memorisation before teaching)."""
    info: dict[str, Any] = {}
    before = copy.deepcopy(lm.model)  # the model that never saw the forget set
    if scenario.teach:
        info["memorisation_before_teaching"] = memorisation(lm, scenario.forget)
        taught = unlearn(lm, scenario.forget, None, teach.training(), progress=progress)
        info["teaching"] = {k: v for k, v in taught.metrics.items() if k != "losses"}
    oracle = with_model(lm, before)
    if scenario.retain or config.loss.needs_retain:  # no retain set: fail here, not later
        oracle_config = replace(config, method="retain_only", stop_forget_ce=None, quant_aware=None)
        unlearn(oracle, [], scenario.retain, oracle_config, progress=progress)
    else:
        log.warning("no retain set: the oracle is the model before teaching, untrained")
    return oracle, info


def measure(
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
    if base is None:
        base = base_metrics(lm, oracle, data, config, eval_config, harm, progress)
    result = unlearn(lm, data.forget, data.retain, config, progress=progress)
    after = _suite(lm, oracle, data, eval_config, harm, result.trained, progress)
    if base.get("harmful_rate"):  # relative reduction; the base rate is reported beside it
        after["harm_reduction"] = 1 - after["harmful_rate"] / base["harmful_rate"]
    training = {k: v for k, v in result.metrics.items() if k != "losses"}
    return {**after, "train_seconds": result.metrics["train_seconds"], "base": base,
            "training": training, "losses": result.metrics["losses"]}  # fmt: skip


def base_metrics(
    lm: LoadedModel,
    oracle: LoadedModel,
    data: Scenario,
    config: UnlearnConfig,
    eval_config: EvalConfig,
    harm: HarmClassifier | None,
    progress: bool,
) -> dict[str, Any]:
    """The suite on the model before unlearning (the distance over what ``config`` trains)."""
    trained = trained_names(lm.model, config.lora)
    return _suite(lm, oracle, data, eval_config, harm, trained, progress)


def _suite(
    lm: LoadedModel,
    oracle: LoadedModel,
    data: Scenario,
    eval_config: EvalConfig,
    harm: HarmClassifier | None,
    trained: list[str],
    progress: bool,
) -> dict[str, Any]:
    return evaluate_model(lm, data.forget, data.retain, data.holdout, eval_config,
                          oracle=oracle.model, harm=harm, trained=trained,
                          progress=progress)  # fmt: skip


def untaught(info: dict[str, Any]) -> dict[str, Any]:
    """Memorisation before teaching (book scenario) as flat ``untaught_*`` metrics."""
    before = info.get("memorisation_before_teaching", {})
    return {f"untaught_{k}": v for k, v in before.items()}


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
