"""Scoring demonstrations with the frozen LLM (spec section 2), through the shared Scorer.

For every training example x, ``candidates`` prompts are drawn from its own task's pool
(never x itself) and the LM reads ``demo + " \\n " + x.input + option``:

- multiple choice: loss_opt = mean NLL of the option's answer tokens;
  score = loss_gold / sum_opt loss_opt (lower is better); one_shot_acc = [argmin == gold];
- generation: greedy decoding until ``"\\n"``; score = 1 - metric (exact match or F1),
  one_shot_acc = metric.

Candidates are kept sorted by ascending score. Scoring appends one JSON line per scored
example to a cache file as it goes, so an interrupted scoring resumes where it stopped;
under ``accelerate launch`` each process scores a contiguous share of the examples into its
own cache file and the main process merges them.
"""

from __future__ import annotations

import json
import logging
import random
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from optlab.core.config import configurable, option, require_positive
from optlab.errors import OptlabError
from optlab.eval.scorer import Scorer
from optlab.retrieve.tasks import SEPARATOR, Example

log = logging.getLogger("optlab")


@configurable("uprise_score")
@dataclass(frozen=True)
class ScoreConfig:
    """How the frozen LLM scores candidate prompts.

    >>> ScoreConfig(candidates=10).candidates
    10
    """

    candidates: int = option(50, "candidate prompts sampled per training example (the paper's L)")
    limit: int | None = option(None, "score only the first N training examples of each task "
                               "(default: all)", flag="--score-limit")  # fmt: skip
    max_new_tokens: int = option(100, "greedy tokens of a generation answer (stops at a "
                                 "newline)")  # fmt: skip
    batch_size: int = option(8, "sequences per forward pass")
    # A demonstration before many inputs of one chunk runs once (the Scorer's shared
    # prefixes): at pool 48, L = 50, chunks of 32 score 1.22-1.49x the prompts/s of chunks of 8.
    chunk: int = option(32, "training examples scored together between two cache writes "
                        "(larger: more shared prompts, more lost to an interrupt)")  # fmt: skip
    sample_seed: int = option(0, "seed of the candidate sampling")

    def __post_init__(self) -> None:
        require_positive(self, "candidates", "limit", "max_new_tokens", "batch_size", "chunk")


# --- the metrics of generation answers (SQuAD's normalisation) ------------------------------


def normalize_answer(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_metric(prediction: str, target: str, metric: str) -> float:
    """Exact match or token F1 of normalised answers, in [0, 1]."""
    pred, gold = normalize_answer(prediction), normalize_answer(target)
    if metric == "exact_match":
        return float(pred == gold)
    common = Counter(pred.split()) & Counter(gold.split())
    overlap = sum(common.values())
    if not overlap:
        return 0.0
    precision, recall = overlap / len(pred.split()), overlap / len(gold.split())
    return 2 * precision * recall / (precision + recall)


# --- scoring ---------------------------------------------------------------------------------


def lm_context(demos: Sequence[str], text: str) -> str:
    """The LM's input before the answer: the demonstrations with the best one *last*, next to
    the input (``p3 \\n p2 \\n p1 \\n input`` for ``demos = [p1, p2, p3]``)."""
    return SEPARATOR.join([*reversed(demos), text])


def option_losses(scorer: Scorer, contexts: Sequence[str], examples: Sequence[Example]) -> list:
    """For each (context, multiple-choice example): the mean NLL of each option's answer
    tokens given the context, as a list per example (one batched scoring call)."""
    requests = [(c, choice) for c, e in zip(contexts, examples, strict=True) for choice in
                e.choices]  # fmt: skip
    tokens = scorer.continuation_tokens(requests)
    scored = iter(scorer.score_tokens(tokens, desc="options"))
    counts = iter(n for _, n in tokens)
    return [[-next(scored)[0] / next(counts) for _ in e.choices] for e in examples]


def choice_score(losses: Sequence[float], gold: int) -> tuple[float, float]:
    """(score, one_shot_acc): loss_gold / sum of the option losses, and whether the gold
    option has the lowest loss."""
    best = min(range(len(losses)), key=losses.__getitem__)
    return losses[gold] / sum(losses), float(best == gold)


def generation_answers(scorer: Scorer, contexts: Sequence[str], max_new_tokens: int) -> list[str]:
    return scorer.generate(list(contexts), until=["\n"], max_new_tokens=max_new_tokens)


def score_pairs(
    scorer: Scorer, demos: Sequence[str], examples: Sequence[Example], max_new_tokens: int
) -> list[tuple[float, float]]:
    """(score, one_shot_acc) of each (demonstration, example) pair."""
    contexts = [lm_context([d], e.input) for d, e in zip(demos, examples, strict=True)]
    out: list[tuple[float, float] | None] = [None] * len(examples)
    choice = [i for i, e in enumerate(examples) if e.is_choice]
    if choice:
        losses = option_losses(scorer, [contexts[i] for i in choice], [examples[i] for i in choice])
        for i, loss in zip(choice, losses, strict=True):
            out[i] = choice_score(loss, examples[i].gold)
    generation = [i for i, e in enumerate(examples) if not e.is_choice]
    if generation:
        answers = generation_answers(scorer, [contexts[i] for i in generation], max_new_tokens)
        for i, answer in zip(generation, answers, strict=True):
            value = answer_metric(answer, examples[i].target, examples[i].metric)
            out[i] = (1.0 - value, value)
    return out  # type: ignore[return-value]


def sample_candidates(
    pool_by_task: dict[str, list[Example]], example: Example, n: int, seed: int
) -> list[Example]:
    """``n`` prompts of the example's own task, never itself (fewer when the pool is
    smaller), drawn by a generator seeded on the example: the draw does not depend on which
    process scores it or whether the scoring resumed."""
    others = [e for e in pool_by_task[example.task] if e.uid != example.uid]
    return random.Random(f"{seed}/{example.uid}").sample(others, min(n, len(others)))


def share(n: int, rank: int, world: int) -> range:
    """Process ``rank``'s contiguous share of ``n`` items (the first ``n % world`` shares
    are one longer), so the ``world`` shares cover every item once."""
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


def _read_cache(folder: Path | None) -> dict[str, dict[str, Any]]:
    """Every example already scored in any process's cache file (a torn last line, from an
    interrupt, is dropped and scored again)."""
    done: dict[str, dict[str, Any]] = {}
    if folder is None or not folder.is_dir():
        return done
    for path in sorted(folder.glob("scores-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row["uid"]] = row
    return done


def score_examples(
    scorer: Scorer,
    targets: Sequence[Example],
    pool_by_task: dict[str, list[Example]],
    config: ScoreConfig,
    *,
    cache: Path | None = None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Score the candidates of this process's share of ``targets``; returns uid ->
    ``{"uid", "task", "candidates": [{"uid", "score", "acc"}, ...]}`` sorted by score, for
    everything in the cache (other processes' shares included once they have written)."""
    done = _read_cache(cache)
    mine = [targets[i] for i in share(len(targets), rank, world)]
    todo = [e for e in mine if e.uid not in done]
    if done and todo != mine:
        log.info("resuming scoring: %d of %d examples already scored", len(mine) - len(todo),
                 len(mine))  # fmt: skip
    handle = None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        handle = open(cache / f"scores-{rank}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
    bar = tqdm(total=len(todo), desc="score prompts", leave=False, disable=not progress or None)
    try:
        for start in range(0, len(todo), config.chunk):
            chunk = todo[start : start + config.chunk]
            drawn = [sample_candidates(pool_by_task, e, config.candidates, config.sample_seed)
                     for e in chunk]  # fmt: skip
            demos = [c.demonstration for cands in drawn for c in cands]
            pairs = [e for e, cands in zip(chunk, drawn, strict=True) for _ in cands]
            results = iter(score_pairs(scorer, demos, pairs, config.max_new_tokens))
            for example, cands in zip(chunk, drawn, strict=True):
                scored = [{"uid": c.uid, **dict(zip(("score", "acc"), next(results),
                                                    strict=True))} for c in cands]  # fmt: skip
                scored.sort(key=lambda c: c["score"])
                row = {"uid": example.uid, "task": example.task, "candidates": scored}
                done[example.uid] = row
                if handle is not None:
                    handle.write(json.dumps(row) + "\n")
                    handle.flush()  # what is on disk survives an interrupt
            bar.update(len(chunk))
    finally:
        bar.close()
        if handle is not None:
            handle.close()
    return done


def training_targets(pool: Sequence[Example], limit: int | None) -> list[Example]:
    """Every example, or the first ``limit`` of each task (the ones to score or test)."""
    seen: Counter[str] = Counter()
    targets = []
    for e in pool:
        if limit is None or seen[e.task] < limit:
            targets.append(e)
            seen[e.task] += 1
    if not targets:
        raise OptlabError("no examples: the pool (or test set) is empty")
    return targets
