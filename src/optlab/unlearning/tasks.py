"""``unlearn:RUN``: the unlearning metric suite as an evaluation task, for any model.

Registered in eval's task table when :mod:`optlab.unlearning` is imported, so
``optlab eval MODEL --tasks unlearn:RUN`` scores a model on the forget / retain / holdout
sets an ``optlab unlearn`` run saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optlab.core.models import LoadedModel
from optlab.errors import OptlabError
from optlab.eval.scorer import Scorer
from optlab.eval.tasks import Task, register_prefix
from optlab.unlearning.data import run_sets
from optlab.unlearning.metrics import EvalConfig, evaluate_model


@register_prefix("unlearn")
def unlearn_task(run: str) -> Task:
    """The unlearning metric suite (without the oracle's) on the data sets of run ``run``."""
    folder = Path(run).expanduser()
    if not (folder / "forget.jsonl").is_file():
        raise OptlabError(f"task {'unlearn:' + run!r}: give an optlab unlearn run, as "
                          "unlearn:RUN (it holds forget.jsonl, retain.jsonl, "
                          "holdout.jsonl)")  # fmt: skip

    def task(scorer: Scorer, *, limit: int | None = None, seq_len: int | None = None,
             **_: Any) -> dict:  # fmt: skip
        sets = list(run_sets(folder).values())
        lm = LoadedModel(scorer.model, scorer.tokenizer, str(folder))
        given = {"samples": limit, "ppl_seq_len": seq_len}  # the rest: EvalConfig's defaults
        config = EvalConfig(**{k: v for k, v in given.items() if v is not None})
        return evaluate_model(lm, *sets, config)

    return task
