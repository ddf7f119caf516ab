"""Early exit (GREEN-CODE): ``exit_train``, ``exit_generate``, ``exit_bench``."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from optlab.api._base import execute_job, job_of, resolve_model
from optlab.core.anatomy import Anatomy
from optlab.core.job import GIVEN, Result
from optlab.core.models import LoadedModel, save_model
from optlab.core.run import Run, peak_memory_gb, seed_everything
from optlab.early_exit.bench import (
    BenchConfig,
    results_csv,
    results_markdown,
    run_bench,
    write_plots,
)
from optlab.early_exit.data import (
    CodeDataConfig,
    CompletionConfig,
    code_items,
    code_texts,
    completion_samples,
    packed_windows,
)
from optlab.early_exit.exits import exits_of, record_exits, resolve_exits
from optlab.early_exit.generate import GenerateConfig, PromptsConfig, generate_samples, summary
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


def exit_generate(
    model: LoadedModel | str | Path,
    config: GenerateConfig | None = None,
    prompts: PromptsConfig | Sequence[str] | str = "def add(a, b):",
    *,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Greedy generation with per-token early exits over a KV cache (``config.exit``: none,
    fixed:L, confidence, policy; ``config.kv``: copy or recompute), or exact self-speculative
    decoding (``config.speculative``). Per sample: the text, tokens, layers run per token,
    seconds and tokens/s (and the drafts' acceptance); ``mean`` over samples. With ``out``,
    a run directory holding them in metrics.json.

    >>> lm = load_model("tiny:llama")
    >>> result = exit_generate(lm, GenerateConfig(exit="fixed:1", max_new_tokens=4),
    ...                        ["def f(x):"], progress=False)
    >>> result["mean"]["layers"], result["samples"]["1"]["tokens"]
    (1.0, 4)
    >>> exact = exit_generate(lm, GenerateConfig(speculative=1, max_new_tokens=4),
    ...                       ["def f(x):"], progress=False)
    >>> full = exit_generate(lm, GenerateConfig(max_new_tokens=4), ["def f(x):"], progress=False)
    >>> exact["samples"]["1"]["text"] == full["samples"]["1"]["text"]
    True
    """
    config = config or GenerateConfig()
    if isinstance(prompts, str):
        prompts = PromptsConfig(prompt=prompts)
    texts = prompts.texts() if isinstance(prompts, PromptsConfig) else list(prompts)
    if not texts:
        raise OptlabError("no prompts to continue")
    lm = resolve_model(model)
    record = prompts if isinstance(prompts, PromptsConfig) else {GIVEN: [len(texts)]}
    job = job_of("exit generate", lm, seed, generate=config, prompts=record)

    def body(run: Run | None) -> dict[str, Any]:
        seed_everything(seed)
        rows = generate_samples(lm, config, texts, progress=progress)
        return {"model": lm.spec, "mean": summary(rows),
                "samples": {str(i): row for i, row in enumerate(rows, 1)}}  # fmt: skip

    return execute_job(job, body, out, force)


def exit_bench(
    model: LoadedModel | str | Path,
    config: BenchConfig | None = None,
    *,
    data: CodeDataConfig | None = None,
    completion: CompletionConfig | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """GREEN-CODE's evaluation in one process: on completion samples of ``config.split``
    of ``data`` (``completion``: a 20% context, 15 new greedy tokens), the all-layers
    model, the PPO policy (``config.policy``) and the confidence rule at each tau, fixed
    exits and self-speculation at each E. Per setting (``settings``): mean executed layers,
    quality against the references and relative to all layers, seconds and energy per
    sample (the meter's backend named), tokens/s, acceptance, outputs identical to all
    layers'. With ``out``: metrics.json, results.csv, results.md and PNG plots.

    >>> result = exit_bench("tiny:llama", BenchConfig(taus=(0.5,), fixed=(1,),
    ...     speculative=(1,)), completion=CompletionConfig(samples=1, max_context=32, new_tokens=4),
    ...     progress=False)
    >>> list(result["settings"]), result["energy_backend"]
    (['none', 'confidence@0.5', 'fixed:1', 'speculative:1'], 'proxy')
    >>> result["settings"]["none"]["relative"]["rouge_l"], result["settings"]["fixed:1"]["layers"]
    (1.0, 1.0)
    """
    config = config or BenchConfig()
    data = data or CodeDataConfig()
    completion = replace(completion or CompletionConfig(), seed=seed)
    lm = resolve_model(model)
    # The context and the new tokens must fit in the model's positions.
    room = window_length(lm.model, None) - completion.new_tokens
    if room < 1:
        raise OptlabError(f"--new-tokens {completion.new_tokens} leaves no room for a context "
                          f"in the model's {room + completion.new_tokens} positions")  # fmt: skip
    if completion.max_context > room:
        log.debug("--max-context %d: capped at %d (the model's positions less the new tokens)",
                 completion.max_context, room)  # fmt: skip
        completion = replace(completion, max_context=room)
    layers = len(Anatomy.of(lm.model).blocks)
    for exits in [config.exits or "auto", *([layer] for layer in config.fixed)]:
        resolve_exits(exits, layers)  # an exit outside the model fails before the run
    for draft in config.speculative:
        if draft >= layers:
            raise OptlabError(f"--speculative {draft}: a draft exit must be in 1..{layers - 1} "
                              f"(the model has {layers} layers)")  # fmt: skip
    items = code_items(data.data, config.split, data.extensions)  # bad data fails here
    if config.policy is not None:  # a policy for another model fails before the run
        from optlab.early_exit.rules import exit_rule

        exit_rule("policy", lm, exits_of(lm, config.exits), config.taus[0],
                  policy=config.policy)  # fmt: skip
    job = job_of("exit bench", lm, seed, bench=config, data=data, completion=completion)

    def body(run: Run | None) -> dict[str, Any]:
        seed_everything(seed)
        samples = completion_samples(items, lm.tokenizer, completion)
        bench = run_bench(lm, config, samples, progress=progress)
        if run is not None:
            run.save_text("results.csv", results_csv(bench))
            run.save_text("results.md", results_markdown(bench))
            bench["plots"] = write_plots(bench, run.dir)
        log.info("exit bench:\n%s", results_markdown(bench))
        return bench

    return execute_job(job, body, out, force)
