"""The public API in one place; ``optlab/__init__`` re-exports it lazily."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.layerwise import BlockContext, run_layerwise
from optlab.core.models import LoadedModel, load_model
from optlab.core.run import Run, seed_everything
from optlab.errors import OptlabError
from optlab.eval.perplexity import perplexity
from optlab.eval.scorer import Scorer, context_length
from optlab.eval.tasks import get_task, run_tasks

__all__ = [
    "Anatomy", "BlockContext", "LoadedModel", "OptlabError", "Run", "Scorer", "describe_model",
    "evaluate", "get_task", "load_model", "perplexity", "run_layerwise", "run_tasks",
    "weight_matrix",
]  # fmt: skip


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
    lm: LoadedModel,
    tasks: list[str],
    *,
    limit: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    out: str | Path | None = None,
    force: bool = False,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run named tasks on a model; with ``out``, also write a run directory.

    >>> evaluate(load_model("default"), ["ppl:wiki"], seq_len=512, limit=40)
    {'model': 'default', 'tasks': {'ppl:wiki': {'perplexity': 16.9, ...}}, 'seconds': 61.0}
    """
    native = context_length_native(lm)
    if seq_len is not None and native is not None and seq_len > native:
        raise OptlabError(f"--seq-len {seq_len} exceeds the model's context length {native}")
    for name in tasks:
        get_task(name)
    run = None
    if out is not None:
        run = Run(out, config=config or {"model": lm.spec, "tasks": tasks}, seed=seed,
                  device=str(lm.device), force=force)  # fmt: skip
    try:
        seed_everything(seed)
        scorer = Scorer(lm, batch_size=batch_size, progress=progress,
                        max_length=max(seq_len or 0, context_length(lm.model)))  # fmt: skip
        start = time.perf_counter()
        results = run_tasks(scorer, tasks, limit=limit, seq_len=seq_len)
        result = {"model": lm.spec, "tasks": results, "seconds": time.perf_counter() - start}
        if run is not None:
            run.add_metrics(result)
            run.save_text("report.md", eval_report(result))
            result["run"] = str(run.finish())
    except BaseException:
        if run is not None:
            run.abort()
        raise
    return result


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
