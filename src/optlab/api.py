"""The public API in one place; ``optlab/__init__`` re-exports it lazily.

Every command is a function here: it takes a model (a :class:`LoadedModel`, or a spec or run
directory that :func:`resolve_model` loads), its config, and its data as arguments, and
returns a :class:`Result`; with ``out=`` it also writes a run directory through the one run
harness (:func:`optlab.core.run.execute`) whose ``config.yaml`` replays it
(``optlab rerun``).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from optlab.audit import reliability, skeb
from optlab.audit.graph import GraphConfig
from optlab.audit.reliability import ReliabilityConfig
from optlab.audit.skeb import SkebConfig
from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.calibration import Calibration
from optlab.core.job import GIVEN, Job, Result, load_job, run_job
from optlab.core.layerwise import BlockContext, batched, run_layerwise
from optlab.core.models import LoadedModel, load_model, save_model
from optlab.core.run import Run, execute, peak_memory_gb, seed_everything
from optlab.errors import OptlabError
from optlab.eval.perplexity import PerplexityEval, perplexity
from optlab.eval.scorer import Scorer, context_length, window_length
from optlab.eval.tasks import TaskEval, get_task, run_tasks
from optlab.prune import pruner
from optlab.prune.masks import save_sparse_model
from optlab.prune.pruner import MagnitudeConfig, PruneMethodConfig, SparseGPTConfig, WandaConfig
from optlab.quant import quantize as quant
from optlab.quant.quantize import (
    AvgBitsConfig,
    CMPQConfig,
    GPTQConfig,
    MaxSizeConfig,
    PMPQConfig,
    RTNConfig,
    StorageConfig,
    TDMPQConfig,
    TiersConfig,
    UniformConfig,
)
from optlab.retrain import perp as retraining
from optlab.retrain.job import source_run
from optlab.retrain.perp import PerpConfig
from optlab.unlearn import job as unlearning
from optlab.unlearn.data import Example, save_examples
from optlab.unlearn.metrics import EvalConfig
from optlab.unlearn.scenarios import Scenario, UnlearnData, known_facts
from optlab.unlearn.trainer import TeachConfig, UnlearnConfig

__all__ = [
    "Anatomy",
    "AvgBitsConfig",
    "BlockContext",
    "CMPQConfig",
    "Calibration",
    "EvalConfig",
    "Example",
    "GPTQConfig",
    "LoadedModel",
    "MagnitudeConfig",
    "MaxSizeConfig",
    "OptlabError",
    "PMPQConfig",
    "PerplexityEval",
    "RTNConfig",
    "Result",
    "Run",
    "Scenario",
    "Scorer",
    "SparseGPTConfig",
    "StorageConfig",
    "TDMPQConfig",
    "TaskEval",
    "TeachConfig",
    "TiersConfig",
    "UniformConfig",
    "UnlearnConfig",
    "UnlearnData",
    "WandaConfig",
    "describe_model",
    "evaluate",
    "get_task",
    "info",
    "load_model",
    "perplexity",
    "prune",
    "quantize",
    "rerun",
    "resolve_model",
    "run_layerwise",
    "run_tasks",
    "unlearn",
    "unlearn_sweep",
    "weight_matrix",
]  # fmt: skip

log = logging.getLogger("optlab")
QUANT_CALIB = Calibration(n=32, seq_len=512)  # CPTQuant's calibration: 32 windows of 512


def resolve_model(
    model: LoadedModel | str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """A loaded model as is; a spec or run directory loaded (the one resolver of inputs).

    >>> resolve_model("tiny:opt").family
    'opt'
    """
    if isinstance(model, LoadedModel):
        return model
    return load_model(str(model), dtype=dtype, device=device, seed=seed)


def _job(
    command: str,
    lm: LoadedModel,
    seed: int,
    inputs: dict[str, Any] | None = None,
    **configs: Any,
) -> Job:
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    return Job(command, inputs or {"model": lm.spec}, configs, seed=seed, device=str(lm.device),
               dtype=dtype, model_seed=None if lm.seed == seed else lm.seed)  # fmt: skip


def _execute(job: Job, body: Any, out: str | Path | None, force: bool) -> Result:
    metrics, path = execute(body, out=out, config=job.to_dict(), seed=job.seed,
                            device=job.device, dtype=job.dtype, force=force)  # fmt: skip
    return Result(metrics, path)


def _windows(
    lm: LoadedModel, calib: Calibration | torch.Tensor, seed: int, default: int | None = None
) -> torch.Tensor:
    if isinstance(calib, torch.Tensor):
        return calib
    seq_len = window_length(lm.model, calib.seq_len, default=default)
    return calib.windows(lm.tokenizer, seq_len, seed)


def _data_record(data: Any) -> Any:
    """How config.yaml records data given in Python (a tensor: its shape; a :class:`Scenario`:
    its forget / retain / holdout sizes), and that it cannot replay."""
    if isinstance(data, torch.Tensor):
        return {GIVEN: list(data.shape)}
    if isinstance(data, Scenario):
        return {GIVEN: [len(data.forget), len(data.retain), len(data.holdout)]}
    return data


def prune(
    model: LoadedModel | str | Path,
    config: PruneMethodConfig,
    *,
    calib: Calibration | torch.Tensor | None = None,
    evaluation: PerplexityEval | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Prune every decoder-block linear of ``model`` in place (magnitude, Wanda or SparseGPT,
    chosen by the config's type), on ``calib`` (a :class:`Calibration` spec, by default 128
    windows of the context from ``wiki:calib``, or an (n, seq_len) tensor of token ids).
    With ``evaluation``, also measure ``wiki:eval`` perplexity; with ``out``, write a run
    holding the pruned model (``model/``) and its masks (``masks.safetensors``).

    >>> lm = load_model("tiny:llama")
    >>> result = prune(lm, WandaConfig(sparsity=0.5), calib=Calibration(n=4, seq_len=32),
    ...                progress=False)
    >>> result["sparsity"]["total"]
    0.5
    """
    lm = resolve_model(model)
    calib = Calibration() if calib is None else calib
    job = _job("prune", lm, seed, method=config, calib=_data_record(calib), eval=evaluation)

    def body(run: Run | None) -> dict[str, Any]:
        log.info("pruning %s with %s (%s)", lm.spec, config.TYPE, config.pattern)
        windows = _windows(lm, calib, seed) if pruner.needs_calibration(config) else None
        batch = calib.batch_size if isinstance(calib, Calibration) else 8
        metrics = pruner.prune(lm, config, windows, batch_size=batch, progress=progress)
        log.info("sparsity %.4f in %.1f s", metrics["sparsity"]["total"], metrics["prune_seconds"])
        seq_len = windows.shape[1] if windows is not None else getattr(calib, "seq_len", None)
        if evaluation is not None and evaluation.enabled:
            metrics["perplexity"] = evaluation.measure(lm, seq_len, progress)
        metrics.update(peak_memory_gb())
        if run is not None:
            save_sparse_model(lm, run.dir)
        return metrics

    return _execute(job, body, out, force)


def quantize(
    model: LoadedModel | str | Path,
    allocation: quant.AllocationConfig,
    *,
    sensitivity: quant.SensitivityConfig | None = None,
    quantizer: quant.QuantizerConfig | None = None,
    storage: quant.StorageConfig | None = None,
    calib: Calibration | torch.Tensor | None = None,
    evaluation: PerplexityEval | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Mixed-precision weight-only quantization (CPTQuant) of ``model`` in place: score each
    decoder layer (``sensitivity``: TDMPQ by default) on ``calib`` (32 x 512 tokens of
    ``wiki:calib`` by default), give bits under ``allocation`` (``AvgBitsConfig(4.5)``,
    ``MaxSizeConfig``, ``TiersConfig``, ``UniformConfig``), and pack every block linear
    (``quantizer``: RTN or GPTQ). With ``out``, write the reloadable packed model
    (``model/``), ``sensitivity.json``, ``bits.json``, ``sensitivity.png`` and the real size.

    >>> lm = load_model("tiny:llama")
    >>> result = quantize(lm, AvgBitsConfig(avg_bits=6.0, widths="8,4"),
    ...                   quantizer=RTNConfig(group_size=32),
    ...                   calib=Calibration(corpus="book", n=4, seq_len=32), progress=False)
    >>> result["avg_bits"] <= 6.0, sorted(set(result["bits_per_unit"].values()))
    (True, [4, 8])
    """
    lm = resolve_model(model)
    sensitivity = sensitivity or quant.TDMPQConfig()
    quantizer = quantizer or quant.RTNConfig()
    storage = storage or quant.StorageConfig()
    calib = QUANT_CALIB if calib is None else calib
    if sensitivity.scores_from is not None and isinstance(allocation, quant.UniformConfig):
        raise OptlabError("--scores-from reuses sensitivities: --uniform has none")
    job = _job("quantize", lm, seed, sensitivity=sensitivity, allocation=allocation,
               quantizer=quantizer, storage=storage, calib=_data_record(calib),
               eval=evaluation)  # fmt: skip

    def body(run: Run | None) -> dict[str, Any]:
        seq_len = calib.shape[1] if isinstance(calib, torch.Tensor) else window_length(
            lm.model, calib.seq_len, default=QUANT_CALIB.seq_len)  # fmt: skip
        parameters = sum(p.numel() for p in lm.model.parameters())
        metrics: dict[str, Any] = {"fp16_bytes": 2 * parameters}
        measure = evaluation is not None and evaluation.enabled
        if measure:
            metrics["perplexity_before"] = evaluation.measure(lm, seq_len, progress)
        windows = None
        if quant.needs_windows(allocation, sensitivity, quantizer):
            batch = calib.batch_size if isinstance(calib, Calibration) else 8
            windows = batched(_windows(lm, calib, seed, QUANT_CALIB.seq_len), batch)
        settings = quant.score_settings(sensitivity, allocation, quantizer, calib, seed, lm.spec)
        scores = None
        if sensitivity.scores_from is not None:
            units = quant.sensitivity_units(lm.model, sensitivity.granularity)
            scores = quant.reused_scores(sensitivity.scores_from, settings, list(units))
            log.info("reusing the %s sensitivities of %s", sensitivity.TYPE,
                     sensitivity.scores_from)  # fmt: skip
        result = quant.quantize(lm, allocation, sensitivity=sensitivity, quantizer=quantizer,
                                storage=storage, windows=windows, scores=scores, seed=seed,
                                progress=progress)  # fmt: skip
        if measure:
            metrics["perplexity_after"] = evaluation.measure(lm, seq_len, progress)
        metrics.update({key: result[key] for key in (
            "avg_bits", "effective_bits", "embeddings", "kernels", "sensitivity_seconds",
            "quantize_seconds")})  # fmt: skip
        metrics["bits_per_unit"] = result["unit_bits"]
        if run is not None:
            method = None if isinstance(allocation, quant.UniformConfig) else sensitivity.TYPE
            sizes = quant.save_run(run.dir, lm, result, quantizer, storage, settings, method,
                                   sensitivity.granularity)  # fmt: skip
            metrics |= sizes | {
                "compression_vs_fp16": metrics["fp16_bytes"] / sizes["file_bytes"],
                "file_bits_per_parameter": 8 * sizes["file_bytes"] / parameters,
            }
            limit = getattr(allocation, "max_size_mb", None)
            if limit is not None and sizes["file_bytes"] > limit * 1e6:
                raise RuntimeError(f"{sizes['file_bytes']} bytes written, over --max-size")
        log.info("quantized to %.3f average bits", metrics["avg_bits"])
        metrics.update(peak_memory_gb())
        return metrics

    return _execute(job, body, out, force)


def retrain(
    model: LoadedModel | str | Path,
    config: PerpConfig | None = None,
    *,
    dense: LoadedModel | str | Path | None = None,
    evaluation: PerplexityEval | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Retrain a pruned model (a prune run directory, or a loaded pruned model) in place: PERP
    (biases, norms and masked LoRA adapters, merged back), full retraining with the masks
    re-applied, or block-wise reconstruction of ``dense`` (by default the run's own dense
    model). The sparsity mask holds exactly (``mask_held``).

    >>> lm = load_model("tiny:llama")
    >>> _ = prune(lm, MagnitudeConfig(), progress=False)
    >>> result = retrain(lm, PerpConfig(steps=2, seq_len=32, corpus="book"), progress=False)
    >>> result["mask_held"], len(result["losses"])
    (True, 2)
    """
    config = replace(config or PerpConfig(), seed=seed)  # the call's seed is the config's
    source: Path | None = None
    if not isinstance(model, LoadedModel):
        source, source_config = source_run(model)
        lm = load_model(str(source), seed=seed)
        if config.method == "reconstruct" and dense is None:
            dense = source_config.get("model")
            if not dense:
                raise OptlabError(f"{source}/config.yaml does not name the dense model to match")
            dense = load_model(str(dense), seed=source_config.get("seed", 0))
    else:
        lm = model
    # The job records the window really used: PERP's default 512 capped at a short context.
    config = replace(config, seq_len=window_length(lm.model, config.seq_len,
                                                   default=PerpConfig.seq_len))  # fmt: skip
    if config.method == "reconstruct" and dense is None:
        raise OptlabError("reconstruct needs the dense model: pass dense=")
    dense_lm = None if dense is None else resolve_model(dense)
    job = _job("retrain", lm, seed, {"run": str(source or lm.spec)}, method=config,
               eval=evaluation)  # fmt: skip

    def body(run: Run | None) -> dict[str, Any]:
        metrics = retraining.retrain(lm, config, dense=dense_lm, progress=progress)
        share, held = 100 * metrics["trainable_share"], metrics["mask_held"]
        log.info("retrained %.3f%% of the parameters; mask held: %s", share, held)
        if evaluation is not None and evaluation.enabled:
            metrics["perplexity"] = evaluation.measure(lm, config.seq_len, progress)
        source_metrics = None if source is None else source / "metrics.json"
        if source_metrics is not None and source_metrics.exists():
            metrics["source_perplexity"] = json.loads(source_metrics.read_text()).get("perplexity")
        metrics.update(peak_memory_gb())
        if run is not None:
            save_sparse_model(lm, run.dir)
        return metrics

    return _execute(job, body, out, force)


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

    return _execute(job, body, out, force)


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
    device, dtype = str(lm.device), str(next(lm.model.parameters()).dtype).removeprefix("torch.")

    def load(spec: str) -> LoadedModel:
        return load_model(spec, dtype=dtype, device=device, seed=seed)

    base = load(config.base) if config.base else None
    variants = {v: load(v) for v in config.variants}
    judge = GraphJudge(graph) if config.judge == "graph" else ModelJudge(
        Scorer(load(config.judge), batch_size=config.batch_size, progress=progress))  # fmt: skip
    job = _job("audit skeb", lm, seed, audit=config)

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

    return _execute(job, body, out, force)


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
    job = _job("unlearn", lm, seed, method=config, data=_data_record(data), teach=teach,
               eval=evaluation, output=unlearning.UnlearnOutput(save))  # fmt: skip

    def body(run: Run | None) -> dict[str, Any]:
        scenario = data.build(lm, seed) if isinstance(data, UnlearnData) else data
        harm = data.harm_classifier() if isinstance(data, UnlearnData) else None
        if run is not None:
            for name in ("forget", "retain", "holdout"):
                save_examples(run.dir / f"{name}.jsonl", getattr(scenario, name))
        oracle, info = unlearning.prepare(lm, scenario, config, teach, progress)
        metrics = unlearning.measure(lm, oracle, scenario, config, evaluation, harm, progress)
        metrics |= {"scenario": scenario.name, **scenario.info, **info,
                    **unlearning.untaught(info)}  # fmt: skip
        metrics.update(peak_memory_gb())
        if run is not None:
            run.save_text("report.md", unlearning.report(metrics))
            if save:
                save_model(lm, run.dir / "model")
        return metrics

    return _execute(job, body, out, force)


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
    grid = unlearning.SweepConfig(tuple(methods), tuple(seeds))
    if not grid.methods or not grid.seeds:
        raise OptlabError("the sweep needs at least one method and one seed")
    base_lm = resolve_model(model)
    data_record = _data_record(data)
    job = _job("unlearn sweep", base_lm, grid.seeds[0], method=config, sweep=grid,
               data=data_record, teach=teach, eval=evaluation)  # fmt: skip

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
            taught = unlearning.with_model(base_lm, copy.deepcopy(base_lm.model))
            oracle, info = unlearning.prepare(taught, scenario, seeded, teach, progress)
            base = unlearning.base_metrics(taught, oracle, scenario, seeded, evaluation, harm,
                                           progress)  # fmt: skip
            for method in grid.methods:
                run_id = f"{method}-seed{seed}"
                log.info("sweep: %s", run_id)
                lm = unlearning.with_model(taught, copy.deepcopy(taught.model))
                method_config = replace(seeded, method=method)
                metrics = unlearning.measure(lm, oracle, scenario, method_config, evaluation,
                                             harm, progress, base=base)  # fmt: skip
                metrics |= unlearning.untaught(info)
                rows.append(unlearning.runs_row(run_id, scenario.name, seed, method, metrics))
                if run is not None:  # each run is the single unlearn job that replays it
                    single = _job("unlearn", base_lm, seed, method=method_config,
                                  data=data_record, teach=teach, eval=evaluation,
                                  output=unlearning.UnlearnOutput(save=False))  # fmt: skip
                    with Run(run.dir / run_id, config=single.to_dict(), seed=seed,
                             device=job.device, dtype=job.dtype) as sub:  # fmt: skip
                        sub.add_metrics({**metrics, "scenario": scenario.name, **scenario.info,
                                         **info})  # fmt: skip
                    run.save_text("runs.csv", unlearning.runs_csv(rows))  # a crash keeps rows
                del lm
        return {"runs": len(rows), "methods": list(grid.methods), "seeds": list(grid.seeds),
                "rows": rows}  # fmt: skip

    result = _execute(job, body, out, force)
    if result.run is not None:
        result.metrics["runs_csv"] = str(result.run / "runs.csv")
    return result


def rerun(
    run: str | Path,
    *,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Replay a run from its ``config.yaml`` (the same command, configs and seed).

    >>> first = prune("tiny:llama", MagnitudeConfig(), out="runs/m50", progress=False)
    >>> again = rerun("runs/m50", out="runs/m50-again", progress=False)
    >>> again["sparsity"] == first["sparsity"], again.run.name
    (True, 'm50-again')
    """
    return run_job(load_job(run), out, force=force, progress=progress)


def describe_model(lm: LoadedModel) -> dict[str, Any]:
    """Family, blocks, parameters, context and the linears of a block, as plain data.

    >>> describe_model(load_model("tiny:llama"))["linears_per_block"]
    7
    """
    anatomy = Anatomy.of(lm.model)
    linears = {
        name: list(weight_matrix(module).shape)
        for name, module in anatomy.linears(anatomy.blocks[0]).items()
    }
    per_block = sum(p.numel() for p in anatomy.blocks[0].parameters())
    return {
        "model": lm.spec,
        "family": anatomy.family,
        "blocks": len(anatomy.blocks),
        "parameters": anatomy.parameter_count(),
        "parameters_per_block": per_block,
        "hidden_size": lm.model.config.hidden_size,
        "vocab_size": lm.model.config.vocab_size,
        "context_length": context_length_native(lm),
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "linears_per_block": len(linears),
        "linears": {name: "x".join(map(str, shape)) for name, shape in linears.items()},
    }


def evaluate(
    model: LoadedModel | str | Path,
    tasks: TaskEval | list[str] | tuple[str, ...],
    *,
    limit: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Run named tasks on a model (a :class:`TaskEval`, or task names with ``limit``,
    ``seq_len`` and ``batch_size``); with ``out``, also write a run directory.

    >>> result = evaluate(load_model("tiny:llama"), ["ppl:book"], seq_len=64, limit=2,
    ...                   progress=False)
    >>> result["tasks"]["ppl:book"]["windows"]
    2
    """
    if not isinstance(tasks, TaskEval):
        tasks = TaskEval(tuple(tasks), limit=limit, seq_len=seq_len, batch_size=batch_size)
    lm = resolve_model(model)
    if tasks.seq_len is not None:
        window_length(lm.model, tasks.seq_len)  # refuses a window past the context
    job = _job("eval", lm, seed, tasks=tasks)

    def body(run: Run | None) -> dict[str, Any]:
        scorer = Scorer(lm, batch_size=tasks.batch_size, progress=progress,
                        max_length=max(tasks.seq_len or 0, context_length(lm.model)))  # fmt: skip
        start = time.perf_counter()
        results = {}
        for name in tasks.tasks:
            limit = tasks.limit_of(name)
            results |= run_tasks(scorer, [name], limit=limit, seq_len=tasks.seq_len)
        result = {"model": lm.spec, "tasks": results, "seconds": time.perf_counter() - start}
        if run is not None:
            run.save_text("report.md", eval_report(result))
        return result

    return _execute(job, body, out, force)


def info(model: LoadedModel | str | Path) -> Result:
    """Describe a model: family, blocks, parameters, context and the linears of a block.

    >>> info("tiny:gpt2")["linears"]["mlp.c_fc"]  # GPT-2's Conv1D shown as out x in
    '256x64'
    """
    return Result(describe_model(resolve_model(model)))


def context_length_native(lm: LoadedModel) -> int | None:
    config = lm.model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def eval_report(result: dict[str, Any]) -> str:
    """A Markdown table of task metrics."""
    lines = [
        f"# Evaluation of `{result['model']}`",
        "",
        "| task | metric | value |",
        "|---|---|---|",
    ]
    for task, metrics in result["tasks"].items():
        for metric, value in metrics.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {task} | {metric} | {shown} |")
    lines += ["", f"Evaluated in {result['seconds']:.1f} s."]
    return "\n".join(lines) + "\n"
