"""Evaluation and model description: ``evaluate`` and ``info``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from optlab.api._base import execute_job, job_of, resolve_model
from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.job import Result
from optlab.core.models import LoadedModel
from optlab.core.run import Run
from optlab.eval.scorer import Scorer, context_length, native_context, window_length
from optlab.eval.tasks import TaskEval, run_tasks

log = logging.getLogger("optlab")


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
        "context_length": native_context(lm.model),
        "dtype": lm.dtype_name,
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
    job = job_of("eval", lm, seed, tasks=tasks)

    def body(run: Run | None) -> dict[str, Any]:
        scorer = Scorer(lm, batch_size=tasks.batch_size, progress=progress,
                        max_length=max(tasks.seq_len or 0, context_length(lm.model)),
                        compile=tasks.compile)  # fmt: skip
        start = time.perf_counter()
        results = {}
        for name in tasks.tasks:
            limit = tasks.limit_of(name)
            results |= run_tasks(scorer, [name], limit=limit, seq_len=tasks.seq_len)
        result = {"model": lm.spec, "tasks": results, "seconds": time.perf_counter() - start}
        if run is not None:
            run.save_text("report.md", eval_report(result))
        return result

    return execute_job(job, body, out, force)


def info(model: LoadedModel | str | Path) -> Result:
    """Describe a model: family, blocks, parameters, context and the linears of a block.

    >>> info("tiny:gpt2")["linears"]["mlp.c_fc"]  # GPT-2's Conv1D shown as out x in
    '256x64'
    """
    return Result(describe_model(resolve_model(model)))


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
