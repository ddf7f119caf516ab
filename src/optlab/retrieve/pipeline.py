"""The UPRISE chain as four stages over run folders: score, train, index, eval.

Every stage writes ``tasks.json`` (the pool and the held-out test examples, the same in
every stage) and its own artefacts into its run; ``sources.json`` names where the earlier
stages' artefacts live, so ``optlab retrieve eval`` on an index run finds the input encoder
of the train run before it. ``optlab retrieve run`` writes all of them into one folder.

    tasks.json    pool + test examples, hold-out cluster, scoring model  (score)
    scores.jsonl  per scored example: its candidates sorted by score    (score)
    mined.jsonl   positive, hard and random negatives per example        (train)
    input_encoder/ prompt_encoder/   sentence-transformers folders       (train)
    index.faiss   the pool's prompt embeddings, IndexFlatIP              (index)
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optlab.core.config import configurable, option, require, require_positive
from optlab.core.files import read_json_object
from optlab.core.models import LoadedModel
from optlab.core.run import atomic_write
from optlab.errors import OptlabError, did_you_mean
from optlab.eval.scorer import Scorer
from optlab.retrieve import infer
from optlab.retrieve.mining import mine
from optlab.retrieve.retriever import (
    INPUT_ENCODER,
    PROMPT_ENCODER,
    RetrieverConfig,
    encode,
    load_encoder,
    train_retriever,
)
from optlab.retrieve.scoring import ScoreConfig, score_examples, share, training_targets
from optlab.retrieve.tasks import Splits

log = logging.getLogger("optlab")
TASKS, SCORES, MINED, SOURCES = "tasks.json", "scores.jsonl", "mined.jsonl", "sources.json"
STAGE_OF = {SCORES: "score", MINED: "train", INPUT_ENCODER: "train", PROMPT_ENCODER: "train",
            infer.INDEX_FILE: "index"}  # fmt: skip


@configurable("uprise_eval")
@dataclass(frozen=True)
class RetrievalEval:
    """How the held-out cluster is evaluated.

    >>> RetrievalEval(k=3, methods=("zero", "uprise")).methods
    ('zero', 'uprise')
    """

    k: int = option(3, "prompts retrieved per test input")
    methods: tuple[str, ...] = option(infer.METHODS, "methods compared (uprise and the "
                                      "baselines zero, random, bm25, knn)",
                                      metavar="M1,M2")  # fmt: skip
    lm: str | None = option(None, "evaluate with this LLM instead of the one that scored "
                            "(the cross-model test)", metavar="MODEL")  # fmt: skip
    limit: int | None = option(None, "first N test examples of each task", flag="--test-limit")
    max_new_tokens: int = option(100, "greedy tokens of a generation answer",
                                 flag="--eval-max-new-tokens")  # fmt: skip
    batch_size: int = option(8, "sequences per forward pass", flag="--eval-batch-size")
    bootstrap: int = option(1000, "bootstrap resamples of each 95% interval")

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            object.__setattr__(self, "methods", tuple(m for m in self.methods.split(",") if m))
        require_positive(self, "k", "limit", "max_new_tokens", "batch_size", "bootstrap")
        require(bool(self.methods), "--methods is empty; e.g. --methods zero,uprise")
        for method in self.methods:
            if method not in infer.METHODS:
                raise did_you_mean("method", method, infer.METHODS)


# --- run folders ---------------------------------------------------------------------------


def write_json(folder: Path, name: str, data: Any) -> None:
    atomic_write(folder / name, json.dumps(data, indent=1) + "\n")


def write_jsonl(folder: Path, name: str, rows: list[dict[str, Any]]) -> None:
    atomic_write(folder / name, "".join(json.dumps(r) + "\n" for r in rows))


def artefact(run: Path, name: str) -> Path:
    """Where ``name`` lives for ``run``: in it, or where its ``sources.json`` says."""
    if (run / name).exists():
        return run / name
    sources = run / SOURCES
    if sources.is_file():
        found = read_json_object(sources, "retrieve run's sources").get(name)
        if found and Path(found).exists():
            return Path(found)
        if found:
            raise OptlabError(f"{str(run)!r} names {found!r} for its {name}, which is gone")
    raise OptlabError(f"{str(run)!r} has no {name}: give a run of `optlab retrieve "
                      f"{STAGE_OF.get(name, 'score')}` (or `optlab retrieve run`)")  # fmt: skip


def read_splits(run: Path) -> tuple[Splits, dict[str, Any]]:
    """The splits of a retrieve run and the rest of its tasks.json (the scoring model)."""
    path = artefact(Path(run), TASKS)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Splits.from_dict(raw), raw
    except (ValueError, KeyError, TypeError) as err:
        raise OptlabError(f"{path}: not a retrieve run's tasks.json ({err})") from None


def inherit(source: Path, folder: Path, names: tuple[str, ...]) -> None:
    """Record in ``folder``'s sources.json where ``source``'s artefacts ``names`` are."""
    found = {name: str(artefact(source, name).resolve()) for name in names}
    write_json(folder, SOURCES, found)
    shutil.copyfile(artefact(source, TASKS), folder / TASKS)


# --- the stages ----------------------------------------------------------------------------


def score_stage(
    lm: LoadedModel,
    splits: Splits,
    config: ScoreConfig,
    folder: Path | None,
    *,
    cache: Path | None,
    progress: bool,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Score the candidates of the pool's training examples with the frozen LM: (uid ->
    scored row, metrics)."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1 and cache is None:
        raise OptlabError("scoring across processes merges their cache files: give --out")
    scorer = Scorer(lm, batch_size=config.batch_size, progress=progress)
    targets = training_targets(splits.pool, config.limit)
    start = time.perf_counter()
    table = score_examples(scorer, targets, splits.by_task(), config, cache=cache,
                           rank=state.process_index, world=state.num_processes,
                           progress=progress)  # fmt: skip
    seconds = time.perf_counter() - start
    mine_n = len(share(len(targets), state.process_index, state.num_processes))
    state.wait_for_everyone()
    if state.num_processes > 1:  # every process's lines, now all written
        table = score_examples(scorer, [], splits.by_task(), config, cache=cache)
    rows = [table[e.uid] for e in targets if e.uid in table]
    if len(rows) != len(targets):
        raise OptlabError(f"scoring ended with {len(rows)} of {len(targets)} examples scored")
    if folder is not None:
        write_jsonl(folder, SCORES, rows)
    accs = [c["acc"] for r in rows for c in r["candidates"]]
    metrics = {"scored_examples": len(rows), "candidates_per_example": config.candidates,
               "mean_one_shot_acc": sum(accs) / max(1, len(accs)),
               "scoring_seconds": seconds,
               "examples_per_second": mine_n / seconds if seconds else None}  # fmt: skip
    return {r["uid"]: r for r in rows}, metrics


def read_scores(run: Path) -> dict[str, dict[str, Any]]:
    path = artefact(run, SCORES)
    table = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            table[row["uid"]] = row
        except (ValueError, KeyError, TypeError) as err:
            raise OptlabError(f"{path}:{number}: not a scores line ({err})") from None
    return table


def train_stage(
    splits: Splits,
    table: dict[str, dict[str, Any]],
    config: RetrieverConfig,
    folder: Path | None,
    *,
    device: str,
    progress: bool,
) -> tuple[Any, dict[str, Any]]:
    """Mine positives and negatives, then train and save the bi-encoder."""
    pool_uids = {task: [e.uid for e in examples] for task, examples in splits.by_task().items()}
    records = mine(table, pool_uids=pool_uids, hard=config.hard_negatives,
                   random_negatives=config.random_negatives, seed=config.train_seed)  # fmt: skip
    text_of = {e.uid: e.input for e in splits.pool}
    demo_of = {e.uid: e.demonstration for e in splits.pool}
    model, metrics = train_retriever(records, text_of, demo_of, config, device=device,
                                     progress=progress)  # fmt: skip
    if folder is not None:
        write_jsonl(folder, MINED, records)
        model.save(folder)
    dropped = len(table) - len(records)
    return model, {"mined_examples": len(records), "dropped_no_positive": dropped, **metrics}


def index_stage(splits: Splits, prompt_encoder: Any, folder: Path | None) -> infer.PromptIndex:
    """Encode the pool's demonstrations with the prompt encoder into the index."""
    start = time.perf_counter()
    index = infer.PromptIndex(encode(prompt_encoder, [e.demonstration for e in splits.pool]))
    log.info("indexed %d prompts in %.1f s", len(index), time.perf_counter() - start)
    if folder is not None:
        index.save(folder / infer.INDEX_FILE)
    return index


def eval_stage(
    lm: LoadedModel,
    splits: Splits,
    config: RetrievalEval,
    *,
    index: infer.PromptIndex | None,
    input_encoder: Any,
    device: str,
    seed: int,
    folder: Path | None = None,
) -> dict[str, Any]:
    """UPRISE and the chosen baselines on the held-out cluster's test examples (``folder``
    gets ``prompts.json``: each method's LM input for the first test example)."""
    pool = splits.pool
    if config.k > len(pool):
        raise OptlabError(f"--k {config.k} is more than the {len(pool)} prompts in the pool")
    tests = splits.test
    if config.limit is not None:
        tests = training_targets(tests, config.limit)  # the first N of each task
    builders = {
        "zero": lambda: infer.zero_selector,
        "random": lambda: infer.random_selector(pool, seed),
        "bm25": lambda: infer.bm25_selector(pool),
        "knn": lambda: infer.knn_selector(pool, device=device),
        "uprise": lambda: infer.dense_selector(input_encoder, index, normalize=False),
    }
    selectors = {m: builders[m]() for m in config.methods}
    scorer = Scorer(lm, batch_size=config.batch_size, progress=False)
    start = time.perf_counter()
    results = infer.evaluate_methods(scorer, pool, tests, selectors, k=config.k,
                                     max_new_tokens=config.max_new_tokens,
                                     bootstrap=config.bootstrap, seed=seed)  # fmt: skip
    if "uprise" in selectors:
        probe = time.perf_counter()
        selectors["uprise"](tests, config.k)
        results["retrieval_ms_per_input"] = 1000 * (time.perf_counter() - probe) / len(tests)
    examples = results.pop("examples")
    if folder is not None:
        write_json(folder, "prompts.json", examples)
    results.update(
        lm=lm.spec,
        hold_out=splits.hold_out,
        k=config.k,
        pool=len(pool),
        test_examples=len(tests),
        eval_seconds=time.perf_counter() - start,
    )
    return results


def load_retriever(run: Path, device: str) -> tuple[Any, Any]:
    return (load_encoder(str(artefact(run, INPUT_ENCODER)), device=device),
            load_encoder(str(artefact(run, PROMPT_ENCODER)), device=device))  # fmt: skip
