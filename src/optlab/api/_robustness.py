"""``audit_robustness``: attack an unlearning run's model (quantize, prune, relearn) and the
model before unlearning, measure both, and report how much of the forgetting each attack
undoes (the pieces without a model are :mod:`optlab.audit.robustness`)."""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from optlab.api._base import execute_job
from optlab.api._compress import QUANT_CALIB, export, prune, quantize
from optlab.audit import robustness as rb
from optlab.audit import skeb
from optlab.audit.robustness import NONE, Attack, RobustnessConfig
from optlab.core.calibration import Calibration
from optlab.core.config import METHODS, config_from_dict
from optlab.core.files import read_json_object
from optlab.core.job import Job, Result
from optlab.core.models import LoadedModel, load_model
from optlab.core.run import Run, atomic_write, require_run_kind
from optlab.core.stats import bootstrap_ci, paired_bootstrap
from optlab.errors import OptlabError
from optlab.quant.gguf_arch import family_of
from optlab.quant.gguf_export import ExportConfig
from optlab.quant.quantize import UniformConfig
from optlab.unlearning.data import Example, run_sets
from optlab.unlearning.job import with_model
from optlab.unlearning.metrics import EvalConfig, evaluate_model
from optlab.unlearning.trainer import TeachConfig, UnlearnConfig, unlearn

log = logging.getLogger("optlab")


@dataclass
class Source:
    """What the audit reads from an unlearning run (never writes to it)."""

    path: Path
    config: dict[str, Any]
    sets: dict[str, list[Example]]
    teach: TeachConfig | None  # how the forget set was taught first (book), or None
    recorded_base: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return str(self.config.get("device", "cpu"))

    @property
    def dtype(self) -> str:
        return str(self.config.get("dtype", "float32"))


def unlearning_source(run: str | Path) -> Source:
    """The run, checked: an ``optlab unlearn`` run that saved its model, data sets and base
    model's name."""
    path = Path(run)
    config = require_run_kind(path, {"unlearn"}, "audit robustness")
    if not (path / "model" / "config.json").is_file():
        raise OptlabError(f"{str(path)!r} holds no unlearned model (made with --no-save?): "
                          "rerun optlab unlearn without --no-save")  # fmt: skip
    if not isinstance(config.get("model"), str):
        raise OptlabError(f"{path}/config.yaml names no base model (a 'model:' key)")
    sets = run_sets(path)
    if not sets["forget"]:
        raise OptlabError(f"{path}/forget.jsonl holds no examples")
    metrics = read_json_object(path / "metrics.json", "unlearning run metrics")
    teach = None
    if "teaching" in metrics:  # the scenario taught the forget set before unlearning it
        teach = config_from_dict(dict(config.get("teach") or {}), TeachConfig)
    base = metrics.get("base") if isinstance(metrics.get("base"), dict) else {}
    recorded = {k: v for k, v in base.items() if k in rb.TABLE_METRICS}
    return Source(path, config, sets, teach, recorded)


def check_attacks(attacks: list[Attack], source: Source, evaluation: EvalConfig) -> dict:
    """Every attack's settings built now (a bad bit width fails before any work), and the
    relearning sets, checked disjoint from the forget set."""
    relearn = {}
    for attack in attacks:
        if attack.kind == "quant":
            UniformConfig(uniform=attack.amount)  # the bit widths the packer offers
        elif attack.kind == "gguf":  # a family GGUF export refuses (OPT) fails now
            family_of(AutoConfig.from_pretrained(source.path / "model"))
        elif attack.kind == "relearn":
            relearn[attack.spec] = rb.relearn_set(source.sets["forget"], source.sets["retain"],
                                                  attack.amount, evaluation.samples)  # fmt: skip
    return relearn


def audit_robustness(
    run: str | Path,
    config: RobustnessConfig | None = None,
    *,
    evaluation: EvalConfig | None = None,
    calib: Calibration | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Does compression bring forgotten knowledge back (Zhang et al., arXiv 2410.16454)?
    Apply each attack of ``config`` (``quant:rtn4``, ``quant:gptq4``, ``gguf:q4_1``,
    ``prune:wanda50``, ``relearn:N``, ...) to the unlearned model of ``run`` and to the model
    before unlearning (the run's base model, taught again when the scenario taught it),
    measure every one (``evaluation``: FA / verbatim memorisation, RA, perplexity, LOSS /
    Min-K% AUCs; SKeB recall per framing for question forget sets) and report the recovery ratio
    (attacked - unlearned) / (before - unlearned) per attack with paired bootstrap 95%
    intervals. ``calib`` feeds GPTQ, Wanda and SparseGPT. The run is only read.

    >>> facts = [Example(a, f"What is the capital of {c}?") for c, a in [("France", "Paris"),
    ...          ("Italy", "Rome"), ("Spain", "Madrid"), ("Peru", "Lima")]]
    >>> small = EvalConfig(max_new_tokens=4, ppl_seq_len=32, ppl_limit=1, samples=2)
    >>> _ = unlearn("tiny:llama", UnlearnConfig(method="ga", steps=2), out="runs/ga",
    ...             data=Scenario("capitals", facts[:2], facts[2:], facts[2:]),
    ...             evaluation=small, progress=False)
    >>> result = audit_robustness("runs/ga", RobustnessConfig(attacks=("quant:rtn8",
    ...                           "relearn:1"), skeb=False, resamples=50), evaluation=small,
    ...                           progress=False)
    >>> sorted(result["models"]["unlearned"]), "FA" in result["recovery"]["quant:rtn8"]
    (['none', 'quant:rtn8', 'relearn:1'], True)
    """
    config = config or RobustnessConfig()
    evaluation = evaluation or EvalConfig()
    calib = calib or QUANT_CALIB
    source = unlearning_source(run)  # everything is checked before anything is written
    attacks = config.parsed
    relearn = check_attacks(attacks, source, evaluation)
    job = Job("audit robustness", {"run": str(run)},
              {"audit": config, "eval": evaluation, "calib": calib}, seed=seed,
              device=source.device, dtype=source.dtype)  # fmt: skip

    def body(out_run: Run | None) -> dict[str, Any]:
        models: dict[str, Callable[[], LoadedModel]] = {}
        before = before_unlearning(source, evaluation, progress)
        models["before"] = lambda: with_model(before, copy.deepcopy(before.model))
        models["unlearned"] = lambda: load_model(str(source.path), dtype=source.dtype,
                                                 device=source.device, seed=seed)  # fmt: skip
        probe = skeb_probe(source, config, evaluation, seed, progress)
        results: dict[str, dict[str, dict[str, Any]]] = {role: {} for role in models}
        values: dict[str, dict[str, dict[str, list[float]]]] = {role: {} for role in models}
        total, done = len(models) * (len(attacks) + 1), 0
        for role, fresh in models.items():
            for attack in (None, *attacks):
                name = NONE if attack is None else attack.spec
                done += 1
                log.info("robustness %d/%d: %s model, attack %s", done, total, role, name)
                lm = fresh()
                applied = {}
                if attack is not None:
                    applied = apply_attack(lm, attack, config, calib, relearn.get(attack.spec),
                                           seed, progress)  # fmt: skip
                metrics = evaluate_model(lm, *source.sets.values(), evaluation,
                                         per_example=True, progress=progress)  # fmt: skip
                values[role][name] = metrics.pop("per_example")
                if probe is not None:
                    recall, per_fact = probe(lm)
                    metrics |= recall
                    values[role][name] |= per_fact
                results[role][name] = metrics | ({"attack": applied} if applied else {})
                del lm
        intervals = ratio_intervals(values, config, seed)
        recovery = rb.recovery_table(results, intervals, config.min_gap)
        table = rb.markdown_table(results, recovery)
        log.info("robustness of %s:\n%s", source.path, table)
        found = {"run": str(source.path), "attacks": [a.spec for a in attacks],
                 "recovery_metric": rb.headline_metric(results), "models": results,
                 "recovery": recovery, "intervals": metric_intervals(values, config, seed),
                 "recorded_base": source.recorded_base,
                 "relearn_examples": {k: len(v) for k, v in relearn.items()}}  # fmt: skip
        if out_run is not None:
            out_run.save_text("report.md", report(found, table))
            atomic_write(out_run.dir / "per_example.json", json.dumps(values))
            for name, png in rb.plots(results, recovery).items():
                atomic_write(out_run.dir / name, png)
        return found

    return execute_job(job, body, out, force)


def before_unlearning(source: Source, evaluation: EvalConfig, progress: bool) -> LoadedModel:
    """The model before unlearning: the run's base model, with the forget set taught again
    exactly as ``optlab unlearn`` taught it (its seed and budget) when the scenario did."""
    seed = int(source.config.get("model_seed", source.config.get("seed", 0)))
    lm = load_model(str(source.config["model"]), dtype=source.dtype, device=source.device,
                    seed=seed)  # fmt: skip
    evaluation.window(lm)  # a window beyond the context fails before any teaching or attack
    if source.teach is not None:
        log.info("teaching the forget set again (%d steps): the model before unlearning",
                 source.teach.steps)  # fmt: skip
        unlearn(lm, source.sets["forget"], None, source.teach.training(), progress=progress)
    return lm


def apply_attack(
    lm: LoadedModel,
    attack: Attack,
    config: RobustnessConfig,
    calib: Calibration,
    relearn: list[Example] | None,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """Attack ``lm`` in place through the public commands; returns what the attack reports."""
    if attack.kind == "quant":
        quantizer = METHODS.get("quantizer", attack.method).config(group_size=config.group_size)
        found = quantize(lm, UniformConfig(uniform=attack.amount), quantizer=quantizer,
                         calib=calib, seed=seed, progress=progress)  # fmt: skip
        return {"avg_bits": found["avg_bits"]}
    if attack.kind == "gguf":
        return gguf_round_trip(lm, attack.method)
    if attack.kind == "prune":
        pruner = METHODS.get("prune", attack.method).config(sparsity=attack.amount / 100)
        found = prune(lm, pruner, calib=calib, seed=seed, progress=progress)
        return {"sparsity": found["sparsity"]["total"]}
    assert relearn is not None  # check_attacks built every relearning set
    training = UnlearnConfig(method="finetune", lora=not config.relearn_full,
                             lr=config.relearn_lr, steps=config.relearn_steps,
                             batch_size=config.relearn_batch, seed=seed)  # fmt: skip
    found = unlearn(lm, relearn, None, training, progress=progress).metrics
    return {"examples": len(relearn), "final_loss": found["final_parts"].get("forget_ce")}


def gguf_round_trip(lm: LoadedModel, weight_type: str) -> dict[str, Any]:
    """``lm``'s weights replaced, in place, by what a GGUF reader computes from the file
    ``optlab export --type weight_type`` writes of it (block linears in that type, embeddings
    and head Q8_0, norms F32): the model a llama.cpp user of the unlearned model runs."""
    with tempfile.TemporaryDirectory(prefix="optlab-gguf-attack-") as scratch:
        path = Path(scratch) / "model.gguf"
        summary = export(lm, ExportConfig(weight_type=weight_type), out=path, progress=False)
        read = load_model(str(path), dtype=lm.dtype_name, device=str(lm.device))
        lm.model.load_state_dict(read.model.state_dict())
    return {"file_bytes": summary["file_bytes"], "tensor_types": summary["tensor_types"]}


def skeb_probe(
    source: Source, config: RobustnessConfig, evaluation: EvalConfig, seed: int, progress: bool
) -> Callable[[LoadedModel], tuple[dict[str, float], dict[str, list[float]]]] | None:
    """SKeB on the forget questions (the countries domain): a function giving a model's
    recall per framing and each fact's recall per framing; None for documents or --no-skeb."""
    if not config.skeb or not any(e.question for e in source.sets["forget"]):
        return None
    from optlab.audit.graph import load_domain
    from optlab.audit.judge import GraphJudge
    from optlab.audit.probes import TemplateLibrary, build_probes, load_facts

    graph = load_domain("countries")
    facts = load_facts(source.path, graph)[: config.skeb_limit]
    probes = build_probes(facts, TemplateLibrary.load(), seed=seed, graph=graph)
    judge = GraphJudge(graph)

    def probe(lm: LoadedModel) -> tuple[dict[str, float], dict[str, list[float]]]:
        responses = skeb.probe_model(lm, probes, max_new_tokens=config.skeb_max_new_tokens,
                                     batch_size=evaluation.batch_size,
                                     progress=progress)  # fmt: skip
        summary, rows = skeb.analyse(graph, facts, probes, responses, judge, seed=seed,
                                     resamples=config.resamples)  # fmt: skip
        per_fact = {f"{rb.SKEB}{framing}": [r["recall"] for r in rows if r["framing"] == framing]
                    for framing in summary["framings"]}  # fmt: skip
        return rb.skeb_recall(summary), per_fact

    return probe


def ratio_intervals(
    values: dict[str, dict[str, dict[str, list[float]]]], config: RobustnessConfig, seed: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """Paired bootstrap of each recovery ratio: the same items resampled for the model
    before unlearning, the unlearned one and the attacked one."""
    before, unlearned = values["before"][NONE], values["unlearned"][NONE]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for attack, attacked in values["unlearned"].items():
        if attack == NONE:
            continue
        out[attack] = {}
        for metric, column in attacked.items():
            if not column or metric == "RA":
                continue
            out[attack][metric] = paired_bootstrap(
                [before[metric], unlearned[metric], column],
                lambda m: rb.recovery_ratio(m[2], m[1], m[0], config.min_gap),
                resamples=config.resamples, seed=seed,
            )  # fmt: skip
    return out


def metric_intervals(
    values: dict[str, dict[str, dict[str, list[float]]]], config: RobustnessConfig, seed: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """A bootstrap 95% interval of every per-example metric of every model."""
    out = {}
    for role, by_attack in values.items():
        for attack, metrics in by_attack.items():
            out[f"{role}/{attack}"] = {m: bootstrap_ci(v, resamples=config.resamples, seed=seed)
                                       for m, v in metrics.items() if v}  # fmt: skip
    return out


def report(found: dict[str, Any], table: str) -> str:
    """report.md: what was attacked, the table, and the base metrics the run recorded."""
    recorded = ", ".join(f"{k} {v:.3g}" for k, v in found["recorded_base"].items()
                         if isinstance(v, float))  # fmt: skip
    return (f"# Robustness of unlearning: `{found['run']}`\n\n"
            f"Attacks: {', '.join(found['attacks'])}. Each is applied to the unlearned model "
            "and to the model before unlearning; `none` is each model as it is.\n\n"
            f"{table}\n"
            f"The unlearning run recorded for its model before unlearning: {recorded or '-'}.\n\n"
            "Plots: `forget_by_attack.png`, `recovery.png`.\n")  # fmt: skip
