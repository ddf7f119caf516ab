"""Early exit (GREEN-CODE): ``exit_train``."""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from optlab.api._base import execute_job, job_of, resolve_model
from optlab.core.anatomy import Anatomy
from optlab.core.job import Result
from optlab.core.models import LoadedModel, save_model
from optlab.core.run import Run, peak_memory_gb, seed_everything
from optlab.early_exit.data import CodeDataConfig, code_texts, packed_windows
from optlab.early_exit.exits import record_exits, resolve_exits
from optlab.early_exit.train import ExitTrainConfig, exit_agreement, train_exits
from optlab.errors import OptlabError
from optlab.eval.scorer import window_length

log = logging.getLogger("optlab")


def exit_train(
    model: LoadedModel | str | Path,
    config: ExitTrainConfig | None = None,
    *,
    data: CodeDataConfig | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Fine-tune ``model`` in place so that every allowed exit predicts the next token through
    the shared final norm and LM head (GREEN-CODE's weighted multi-exit loss), on packed
    windows of the train split of ``data``. Per-exit agreement with the final layer, CE and
    accuracy on held-out windows (``config.eval_split``) are measured before and after.
    With ``out``, write a run whose ``model/`` reloads in plain transformers and whose
    ``config.json`` (and ``config.yaml``) holds the resolved exit set.

    >>> result = exit_train(load_model("tiny:llama"), ExitTrainConfig(
    ...     exits="1", steps=2, batch_size=2, context_length=32, eval_windows=2), progress=False)
    >>> result["exits"], result["optimizer_steps"], sorted(result["after"])
    ([1, 2], 2, ['1', '2'])
    """
    config = replace(config or ExitTrainConfig(), seed=seed)  # the call's seed is the config's
    data = data or CodeDataConfig()
    lm = resolve_model(model)
    num_layers = len(Anatomy.of(lm.model).blocks)
    exits = resolve_exits(config.exits, num_layers)  # an exit outside the model fails here
    context = window_length(lm.model, config.context_length, what="--context-length",
                            default=ExitTrainConfig.context_length)  # fmt: skip
    # The job records what really runs: the resolved exits and the (capped) window.
    config = replace(config, exits=",".join(map(str, exits)), context_length=context)
    train_texts = code_texts(data.data, "train", data.extensions)  # bad data fails here
    eval_texts = code_texts(data.data, config.eval_split, data.extensions) \
        if config.eval_windows else []  # fmt: skip
    for split, texts in (("train", train_texts), (config.eval_split, eval_texts)):
        if not texts and (split == "train" or config.eval_windows):
            raise OptlabError(f"the {split} split of --data {data.data} holds no files (items "
                              "split 80/10/10 by a hash of their names): give more code"
                              + (" or --eval-windows 0" if split != "train" else ""))  # fmt: skip
    job = job_of("exit train", lm, seed, train=config, data=data)

    def body(run: Run | None) -> dict[str, Any]:
        seed_everything(seed)
        rng = random.Random(seed)  # file order: a short run reads files from every package
        rng.shuffle(train_texts)
        rng.shuffle(eval_texts)
        windows = packed_windows(train_texts, lm.tokenizer, context, limit=config.windows_needed)
        held_out = packed_windows(eval_texts, lm.tokenizer, context, limit=config.eval_windows) \
            if eval_texts else None  # fmt: skip

        def agreement() -> dict[str, Any]:
            if held_out is None:
                return {}
            return exit_agreement(lm.model, held_out, exits, batch_size=config.batch_size,
                                  progress=progress)  # fmt: skip

        before = agreement()
        training = train_exits(lm, windows, config, progress=progress)
        after = agreement()
        record_exits(lm.model, exits, training["weights"], config.weights)
        for layer in map(str, exits[:-1]) if after else ():
            log.info("exit %s: agreement %.3f -> %.3f, CE %.3f -> %.3f", layer,
                     before[layer]["agreement"], after[layer]["agreement"], before[layer]["ce"],
                     after[layer]["ce"])  # fmt: skip
        metrics = {"model": lm.spec, "data": data.data, **training, "before": before,
                   "after": after, "eval_split": config.eval_split,
                   "eval_windows": 0 if held_out is None else len(held_out),
                   "context_length": context, **peak_memory_gb()}  # fmt: skip
        if run is not None:
            save_model(lm, run.dir / "model")
        return metrics

    return execute_job(job, body, out, force)
