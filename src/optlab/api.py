"""The public API in one place; ``optlab/__init__`` re-exports it lazily.

Every command is a function here: it takes a model (a :class:`LoadedModel`, or a spec or run
directory that :func:`resolve_model` loads), its config, and its data as arguments, and
returns a :class:`Result`; with ``out=`` it also writes a run directory through the one run
harness (:func:`optlab.core.run.execute`) whose ``config.yaml`` replays it
(``optlab rerun``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.calibration import Calibration
from optlab.core.job import GIVEN, Job, Result, load_job, run_job
from optlab.core.layerwise import BlockContext, run_layerwise
from optlab.core.models import LoadedModel, load_model
from optlab.core.run import Run, execute, peak_memory_gb
from optlab.errors import OptlabError
from optlab.eval.perplexity import PerplexityEval, perplexity
from optlab.eval.scorer import Scorer, context_length
from optlab.eval.tasks import TaskEval, get_task, run_tasks
from optlab.prune import pruner
from optlab.prune.masks import save_sparse_model
from optlab.prune.pruner import MagnitudeConfig, PruneMethodConfig, SparseGPTConfig, WandaConfig

__all__ = [
    "Anatomy",
    "BlockContext",
    "Calibration",
    "LoadedModel",
    "MagnitudeConfig",
    "OptlabError",
    "PerplexityEval",
    "Result",
    "Run",
    "Scorer",
    "SparseGPTConfig",
    "TaskEval",
    "WandaConfig",
    "describe_model",
    "evaluate",
    "get_task",
    "info",
    "load_model",
    "perplexity",
    "prune",
    "rerun",
    "resolve_model",
    "run_layerwise",
    "run_tasks",
    "weight_matrix",
]  # fmt: skip

log = logging.getLogger("optlab")


def resolve_model(
    model: LoadedModel | str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """A loaded model as is; a spec or run directory loaded (the one resolver of inputs)."""
    if isinstance(model, LoadedModel):
        return model
    return load_model(str(model), dtype=dtype, device=device, seed=seed)


def _job(command: str, lm: LoadedModel, seed: int, **configs: Any) -> Job:
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    return Job(command, {"model": lm.spec}, configs, seed=seed, device=str(lm.device),
               dtype=dtype, model_seed=None if lm.seed == seed else lm.seed)  # fmt: skip


def _execute(job: Job, body: Any, out: str | Path | None, force: bool) -> Result:
    metrics, path = execute(body, out=out, config=job.to_dict(), seed=job.seed,
                            device=job.device, dtype=job.dtype, force=force)  # fmt: skip
    return Result(metrics, path)


def _windows(lm: LoadedModel, calib: Calibration | torch.Tensor, seed: int) -> torch.Tensor:
    if isinstance(calib, torch.Tensor):
        return calib
    return calib.windows(lm.tokenizer, calib.seq_len or context_length(lm.model), seed)


def _data_record(data: Any) -> Any:
    """How config.yaml records data given as a tensor: its shape, and that it cannot replay."""
    if isinstance(data, torch.Tensor):
        return {GIVEN: list(data.shape)}
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
        seq_len = windows.shape[1] if windows is not None else None
        if evaluation is not None and evaluation.enabled:
            metrics["perplexity"] = evaluation.measure(lm, seq_len, progress)
        metrics.update(peak_memory_gb())
        if run is not None:
            save_sparse_model(lm, run.dir)
        return metrics

    return _execute(job, body, out, force)


def rerun(
    run: str | Path,
    *,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Replay a run from its ``config.yaml`` (the same command, configs and seed).

    >>> first = prune("tiny:llama", MagnitudeConfig(), out="runs/m50")
    >>> again = rerun("runs/m50", out="runs/m50-again")
    """
    import optlab.commands  # noqa: F401  (registers the commands a config.yaml may name)

    return run_job(load_job(run), out, force=force, progress=progress)


def describe_model(lm: LoadedModel) -> dict[str, Any]:
    """Family, blocks, parameters, context and the linears of a block, as plain data."""
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
    native = context_length_native(lm)
    if tasks.seq_len is not None and native is not None and tasks.seq_len > native:
        raise OptlabError(f"--seq-len {tasks.seq_len} exceeds the model's context length "
                          f"{native}")  # fmt: skip
    job = _job("eval", lm, seed, tasks=tasks)

    def body(run: Run | None) -> dict[str, Any]:
        scorer = Scorer(lm, batch_size=tasks.batch_size, progress=progress,
                        max_length=max(tasks.seq_len or 0, context_length(lm.model)))  # fmt: skip
        start = time.perf_counter()
        results = run_tasks(scorer, list(tasks.tasks), limit=tasks.limit, seq_len=tasks.seq_len)
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
