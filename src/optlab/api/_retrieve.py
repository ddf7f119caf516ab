"""UPRISE prompt retrieval: ``retrieve_score``, ``retrieve_train``, ``retrieve_index``,
``retrieve_eval`` (one stage each, run folder in, run folder out) and ``retrieve_run``
(the whole chain in one run)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from optlab.api._base import execute_job, job_of, resolve_model
from optlab.core.config import config_to_dict
from optlab.core.job import Job, Result
from optlab.core.models import LoadedModel
from optlab.core.run import Run, is_main_process
from optlab.errors import OptlabError
from optlab.retrieve import pipeline
from optlab.retrieve.infer import INDEX_FILE, PromptIndex
from optlab.retrieve.pipeline import (
    INPUT_ENCODER,
    MINED,
    PROMPT_ENCODER,
    SCORES,
    TASKS,
    RetrievalEval,
)
from optlab.retrieve.retriever import RetrieverConfig
from optlab.retrieve.scoring import ScoreConfig
from optlab.retrieve.tasks import Splits, TaskSplit


def _score_cache(
    out: str | Path | None, lm: LoadedModel, split: TaskSplit, score: ScoreConfig
) -> Path | None:
    """Where scoring appends its lines while it works: a hidden folder beside ``out``, keyed
    on what the scores depend on (model, tasks, scoring config). A run is staged and dropped
    when interrupted, so the cache must live outside it for a second start of the same
    command to resume; it is removed once the run is in place."""
    if out is None:
        return None
    what = [lm.spec, lm.seed, config_to_dict(split), config_to_dict(score)]
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode())
    target = Path(out)
    return target.parent / f".{target.name}.scores-{key.hexdigest()[:12]}"


def _finish(result: Result, cache: Path | None) -> Result:
    """The run is in place: its scores no longer need the cache (kept until now, so that an
    interrupt anywhere in ``retrieve run`` resumes without scoring again)."""
    if cache is not None and is_main_process():
        shutil.rmtree(cache, ignore_errors=True)
    return result


def _tasks_record(splits: Splits, lm: LoadedModel) -> dict[str, Any]:
    return {**splits.to_dict(), "model": lm.spec, "model_seed": lm.seed}


def _check_k(evaluation: RetrievalEval, splits: Splits) -> None:
    if evaluation.k > len(splits.pool):
        raise OptlabError(f"--k {evaluation.k} is more than the {len(splits.pool)} prompts in "
                          "the pool")  # fmt: skip


def retrieve_score(
    model: LoadedModel | str | Path,
    split: TaskSplit | None = None,
    config: ScoreConfig | None = None,
    *,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Build the pool of every cluster but ``split.hold_out`` and score ``config.candidates``
    prompts per training example with the frozen LM (``scores.jsonl``; an interrupted
    scoring resumes when started again with the same ``out``).

    >>> result = retrieve_score("tiny:llama", TaskSplit(hold_out="topic", only=("polarity",
    ...     "newsgroups"), pool_size=6, test_size=2), ScoreConfig(candidates=2),
    ...     progress=False)
    >>> result["scored_examples"], result["pool"]
    (6, 6)
    """
    split, config = split or TaskSplit(), config or ScoreConfig()
    lm = resolve_model(model, seed=seed)
    splits = split.build()
    job = job_of("retrieve score", lm, seed, data=split, score=config)
    cache = _score_cache(out, lm, split, config)

    def body(run: Run | None) -> dict[str, Any]:
        folder = None if run is None else run.dir
        if folder is not None:
            pipeline.write_json(folder, TASKS, _tasks_record(splits, lm))
        _, metrics = pipeline.score_stage(lm, splits, config, folder, cache=cache,
                                          progress=progress)  # fmt: skip
        return {"hold_out": split.hold_out, "pool": len(splits.pool), "test": len(splits.test),
                **metrics}  # fmt: skip

    return _finish(execute_job(job, body, out, force), cache)


def retrieve_train(
    run: str | Path,
    config: RetrieverConfig | None = None,
    *,
    device: str = "cpu",
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Mine positives and negatives from a scoring run and train the bi-encoder; ``out``
    gets ``input_encoder/`` and ``prompt_encoder/`` (``SentenceTransformer(path)`` loads
    each) and ``mined.jsonl``.

    >>> tiny = TaskSplit(hold_out="topic", only=("polarity", "newsgroups"), pool_size=6,
    ...                  test_size=2)
    >>> scored = retrieve_score("tiny:llama", tiny, ScoreConfig(candidates=2),
    ...                         out="runs/score-t", progress=False)
    >>> result = retrieve_train("runs/score-t", RetrieverConfig(epochs=1, batch_size=4),
    ...                         out="runs/train-t", progress=False)
    >>> result["steps"], sorted(p.name for p in result.run.glob("*_encoder"))
    (1, ['input_encoder', 'prompt_encoder'])
    """
    config = config or RetrieverConfig()
    source = Path(run)
    splits, _ = pipeline.read_splits(source)
    table = pipeline.read_scores(source)
    job = Job("retrieve train", {"run": str(run)}, {"retriever": config}, seed=seed,
              device=device)  # fmt: skip

    def body(run_: Run | None) -> dict[str, Any]:
        folder = None if run_ is None else run_.dir
        if folder is not None:
            pipeline.inherit(source, folder, (SCORES,))
        _, metrics = pipeline.train_stage(splits, table, config, folder, device=device,
                                          progress=progress)  # fmt: skip
        return metrics

    return execute_job(job, body, out, force)


def retrieve_index(
    run: str | Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Encode the pool with a trained prompt encoder into a FAISS inner-product index
    (``index.faiss``).

    >>> tiny = TaskSplit(hold_out="topic", only=("polarity", "newsgroups"), pool_size=6,
    ...                  test_size=2)
    >>> scored = retrieve_score("tiny:llama", tiny, ScoreConfig(candidates=2),
    ...                         out="runs/score-i", progress=False)
    >>> trained = retrieve_train("runs/score-i", RetrieverConfig(epochs=1, batch_size=4),
    ...                          out="runs/train-i", progress=False)
    >>> retrieve_index("runs/train-i", out="runs/index-i")["prompts"]
    6
    """
    source = Path(run)
    splits, _ = pipeline.read_splits(source)
    _, prompt_encoder = pipeline.load_retriever(source, device)
    job = Job("retrieve index", {"run": str(run)}, {}, seed=seed, device=device)

    def body(run_: Run | None) -> dict[str, Any]:
        folder = None if run_ is None else run_.dir
        if folder is not None:
            pipeline.inherit(source, folder, (SCORES, MINED, INPUT_ENCODER, PROMPT_ENCODER))
        index = pipeline.index_stage(splits, prompt_encoder, folder)
        return {"prompts": len(index), "dimension": int(index.index.d)}

    return execute_job(job, body, out, force)


def retrieve_eval(
    run: str | Path,
    evaluation: RetrievalEval | None = None,
    *,
    device: str = "cpu",
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Test UPRISE and the baselines (zero-shot, random, BM25, MiniLM kNN) on the held-out
    cluster, with the LM that scored or ``evaluation.lm`` (the cross-model test); per task
    the mean and a bootstrap 95% interval.

    >>> tiny = TaskSplit(hold_out="topic", only=("polarity", "newsgroups"), pool_size=6,
    ...                  test_size=2)
    >>> scored = retrieve_score("tiny:llama", tiny, ScoreConfig(candidates=2),
    ...                         out="runs/score-e", progress=False)
    >>> result = retrieve_eval("runs/score-e", RetrievalEval(lm="tiny:opt", k=2, bootstrap=20,
    ...                        methods=("zero", "random", "bm25")))  # no retriever needed
    >>> result["lm"], sorted(result["average"])
    ('tiny:opt', ['bm25', 'random', 'zero'])
    """
    evaluation = evaluation or RetrievalEval()
    source = Path(run)
    splits, raw = pipeline.read_splits(source)
    _check_k(evaluation, splits)
    index = input_encoder = None
    if "uprise" in evaluation.methods:
        index = PromptIndex.load(pipeline.artefact(source, INDEX_FILE))
        input_encoder, _ = pipeline.load_retriever(source, device)
    # The scoring model reloads with the seed it had (a tiny: model's weights depend on it).
    model_seed = raw.get("model_seed", seed) if evaluation.lm is None else seed
    lm = resolve_model(evaluation.lm or raw["model"], device=device, seed=model_seed)
    job = Job("retrieve eval", {"run": str(run)}, {"eval": evaluation}, seed=seed, device=device)

    def body(run_: Run | None) -> dict[str, Any]:
        return pipeline.eval_stage(lm, splits, evaluation, index=index,
                                   input_encoder=input_encoder, device=device, seed=seed,
                                   folder=None if run_ is None else run_.dir)  # fmt: skip

    return execute_job(job, body, out, force)


def retrieve_run(
    model: LoadedModel | str | Path,
    split: TaskSplit | None = None,
    score: ScoreConfig | None = None,
    retriever: RetrieverConfig | None = None,
    evaluation: RetrievalEval | None = None,
    *,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """The whole UPRISE chain in one run: pool and scoring, mining and retriever training,
    the index, and the held-out evaluation with every baseline.

    >>> result = retrieve_run("tiny:llama", TaskSplit(hold_out="topic", only=("polarity",
    ...     "newsgroups"), pool_size=6, test_size=2), ScoreConfig(candidates=2),
    ...     RetrieverConfig(epochs=1, batch_size=4), RetrievalEval(k=2, bootstrap=50),
    ...     progress=False)
    >>> sorted(result["eval"]["average"])
    ['bm25', 'knn', 'random', 'uprise', 'zero']
    """
    split, score = split or TaskSplit(), score or ScoreConfig()
    retriever, evaluation = retriever or RetrieverConfig(), evaluation or RetrievalEval()
    lm = resolve_model(model, seed=seed)
    splits = split.build()
    _check_k(evaluation, splits)
    other = None if evaluation.lm is None else resolve_model(evaluation.lm, seed=seed)
    job = job_of("retrieve run", lm, seed, data=split, score=score, retriever=retriever,
                 eval=evaluation)  # fmt: skip
    cache = _score_cache(out, lm, split, score)
    device = str(lm.device)

    def body(run: Run | None) -> dict[str, Any]:
        folder = None if run is None else run.dir
        if folder is not None:
            pipeline.write_json(folder, TASKS, _tasks_record(splits, lm))
        table, scored = pipeline.score_stage(lm, splits, score, folder, cache=cache,
                                             progress=progress)  # fmt: skip
        model_, trained = pipeline.train_stage(splits, table, retriever, folder, device=device,
                                               progress=progress)  # fmt: skip
        index = pipeline.index_stage(splits, model_.prompt_encoder, folder)
        results = pipeline.eval_stage(other or lm, splits, evaluation, index=index,
                                      input_encoder=model_.input_encoder, device=device,
                                      seed=seed, folder=folder)  # fmt: skip
        trained.pop("losses")
        return {"hold_out": split.hold_out, "pool": len(splits.pool),
                "test": len(splits.test), "score": scored, "train": trained,
                "eval": results}  # fmt: skip

    return _finish(execute_job(job, body, out, force), cache)
