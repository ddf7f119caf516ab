"""Sentence embeddings: ``embed_encode``, ``embed_eval``, ``embed_select_demo`` and
``embed_train`` (PromptEOL)."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from optlab.api._base import execute_job, job_of, resolve_model
from optlab.core.data import read_jsonl
from optlab.core.files import read_text_file
from optlab.core.job import Result
from optlab.core.models import LoadedModel, save_model
from optlab.core.run import Run, atomic_write
from optlab.embed.baseline import BaselineConfig, minilm_encoder
from optlab.embed.contrastive import ContrastiveConfig, train_contrastive
from optlab.embed.demos import SelectDemoConfig, demo_scores, read_candidates
from optlab.embed.prompteol import TEMPLATE, Embedder, PromptEOLConfig
from optlab.embed.sts import STSEval, sts_pairs, sts_spearman
from optlab.embed.transfer import TransferEval, check_folds, classification_set, cross_val_accuracy
from optlab.embed.triplets import TripletData
from optlab.errors import OptlabError

log = logging.getLogger("optlab")


def read_texts(path: str | Path) -> list[str]:
    """The texts of a file: one per line (``.txt``), or each line's ``text`` (``.jsonl``)."""
    if Path(path).suffix == ".jsonl":
        texts = []
        for number, obj in read_jsonl(path, "input file"):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise OptlabError(f"{path}:{number}: expected an object with a 'text' field")
            texts.append(obj["text"])
    else:
        texts = [line for line in read_text_file(path, "input file").splitlines() if line.strip()]
    if not texts:
        raise OptlabError(f"{path}: no texts to embed")
    return texts


def embed_encode(
    model: LoadedModel | str | Path,
    texts: list[str] | str | Path,
    config: PromptEOLConfig | None = None,
    *,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Embed texts (a list, or a ``.txt`` / ``.jsonl`` file) by PromptEOL; with ``out``,
    write the [n, d] float32 array as ``.npy`` (atomically), rows in the texts' order.

    >>> result = embed_encode(load_model("tiny:llama"), ["A dog runs.", "A cat sleeps."])
    >>> result["shape"], result.embeddings.dtype
    ([2, 64], dtype('float32'))
    """
    target = None if out is None else Path(out)
    if target is not None:
        if target.suffix != ".npy":
            raise OptlabError(f"--out {str(target)!r} is not a .npy file: give one to write, "
                              "e.g. emb.npy")  # fmt: skip
        if target.exists() and not force:
            raise OptlabError(f"{str(target)!r} exists; pass --force to replace it")
        if target.is_dir():
            raise OptlabError(f"{str(target)!r} is a folder, not a .npy file")
    items = texts if isinstance(texts, list) else read_texts(texts)
    embedder = Embedder(resolve_model(model), config)
    start = time.perf_counter()
    embeddings = np.asarray(embedder.encode(items, show_progress_bar=None if progress else False))
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {"shape": list(embeddings.shape), "seconds": seconds,
                               "sentences_per_second": len(items) / seconds}  # fmt: skip
    if target is not None:
        buffer = io.BytesIO()
        np.save(buffer, embeddings, allow_pickle=False)
        atomic_write(target, buffer.getvalue())
        metrics["embeddings"] = str(target)
    result = Result(metrics)
    result.embeddings = embeddings  # type: ignore[attr-defined]
    return result


def embed_eval(
    model: LoadedModel | str | Path,
    sts: STSEval | None = None,
    config: PromptEOLConfig | None = None,
    *,
    transfer: TransferEval | None = None,
    baseline: BaselineConfig | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Spearman (x 100) of PromptEOL cosine similarities with human scores on each STS set
    (the shipped Lee documents, WordSim-353, SimLex-999, or your STS-B / SICK file), and the
    k-fold accuracy of logistic regression on the frozen embeddings for each ``transfer``
    task; all-MiniLM-L6-v2 is scored beside on the same pairs and folds (``minilm`` keys)
    unless ``baseline.minilm`` is off.

    >>> result = embed_eval(load_model("tiny:llama"), STSEval(sts=("wordsim353",), limit=20),
    ...                     transfer=TransferEval(classify=("sentiment",), folds=2),
    ...                     progress=False)
    >>> result["sts"]["wordsim353"]["pairs"], result["classify"]["sentiment"]["examples"]
    (20, 200)
    >>> 0 <= result["classify"]["sentiment"]["minilm"]["accuracy"] <= 100
    True
    """
    sts = sts or STSEval()
    config = config or PromptEOLConfig()
    transfer = transfer or TransferEval()
    baseline = baseline or BaselineConfig()
    lm = resolve_model(model)
    sets = {name: sts_pairs(name)[: sts.limit] for name in sts.sts}  # bad files fail first
    tasks = {name: classification_set(name) for name in transfer.classify}
    for name, (_, labels) in tasks.items():
        check_folds(labels, transfer.folds, name)
    job = job_of("embed eval", lm, seed, sts=sts, prompt=config, transfer=transfer,
                 baseline=baseline)  # fmt: skip

    def body(run: Run | None) -> dict[str, Any]:
        embedder = Embedder(lm, config)
        bar = None if progress else False  # None: a bar on a terminal only
        encoders = {"ours": lambda t: embedder.encode(t, show_progress_bar=bar)}
        if baseline.minilm:
            encoders["minilm"] = minilm_encoder(str(lm.device))
        scores: dict[str, Any] = {}
        for name, pairs in sets.items():
            spearman = {who: sts_spearman(encode, pairs) for who, encode in encoders.items()}
            scores[name] = {"spearman": spearman.pop("ours"), "pairs": len(pairs),
                            **{who: {"spearman": s} for who, s in spearman.items()}}  # fmt: skip
            log.info("%s: Spearman x100 %s (%d pairs)", name, _beside(spearman, scores[name],
                     "spearman"), len(pairs))  # fmt: skip
        classified: dict[str, Any] = {}
        for name, (texts, labels) in tasks.items():
            accuracy = {}
            for who, encode in encoders.items():
                mean, std = cross_val_accuracy(np.asarray(encode(texts)), labels,
                                               transfer.folds, seed)  # fmt: skip
                accuracy[who] = {"accuracy": mean, "std": std}
            classified[name] = {**accuracy.pop("ours"), "examples": len(texts),
                                "folds": transfer.folds, **accuracy}  # fmt: skip
            log.info("%s: accuracy %s (%d-fold, %d examples)", name,
                     _beside({k: v["accuracy"] for k, v in accuracy.items()}, classified[name],
                             "accuracy"), transfer.folds, len(texts))  # fmt: skip
        result = {"model": lm.spec, "sts": scores, "dimension": embedder.dimension}
        return result | ({"classify": classified} if classified else {})

    return execute_job(job, body, out, force)


def _beside(others: dict[str, float], ours: dict[str, Any], key: str) -> str:
    """'46.60' or '46.60 (minilm 50.80)': a log line's figures."""
    rest = ", ".join(f"{who} {value:.2f}" for who, value in others.items())
    return f"{ours[key]:.2f}" + (f" ({rest})" if rest else "")


def embed_select_demo(
    model: LoadedModel | str | Path,
    select: SelectDemoConfig | None = None,
    config: PromptEOLConfig | None = None,
    *,
    candidates: list[tuple[str, str]] | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Choose the in-context demonstration for ``model``: every (sentence, word) candidate
    (``select.candidates``, or ``candidates`` given in Python) is scored by the mean dev
    Spearman x100 of its prompt, the plain template too; the best is saved as the run's
    ``prompt.json`` (``--demo RUN`` then uses it) and ``candidates`` lists every score.

    >>> result = embed_select_demo(load_model("tiny:llama"),
    ...     SelectDemoConfig(dev=("wordsim353:dev",)),
    ...     candidates=[("A man is smoking.", "Smoking"), ("meat from a deer.", "Venison")],
    ...     progress=False)
    >>> len(result["candidates"]), result["demo"]["word"] in ("Smoking", "Venison")
    (2, True)
    """
    select = select or SelectDemoConfig()
    config = config or PromptEOLConfig()
    if config.demo is not None:
        raise OptlabError("select-demo chooses the demonstration: drop --demo")
    lm = resolve_model(model)
    given = candidates is not None
    pool = list(candidates) if given else read_candidates(select.candidates)  # type: ignore[arg-type]
    if not pool:
        raise OptlabError("no demonstration candidates to choose from")
    pool = pool[: select.limit]
    dev = {name: sts_pairs(name) for name in select.dev}
    record = select if not given else replace(select, candidates="given_in_python")
    job = job_of("embed select-demo", lm, seed, select=record, prompt=config)

    def body(run: Run | None) -> dict[str, Any]:
        plain, *scored = demo_scores(lm, [None, *pool], dev, config, progress=progress)
        best = max(scored, key=lambda s: s["spearman"])  # the first of equals: stable
        demo = {"sentence": best["sentence"], "word": best["word"], "template": TEMPLATE,
                "dev": list(select.dev), "spearman": best["spearman"],
                "model": lm.spec}  # fmt: skip
        log.info("chosen %r -> %s: dev Spearman %.2f (plain template %.2f)", best["sentence"],
                 best["word"], best["spearman"], plain["spearman"])  # fmt: skip
        if best["spearman"] <= plain["spearman"]:
            log.warning("no candidate beats the plain template on the dev sets")
        if run is not None:
            chosen = replace(config, demo=f"{best['sentence']}=>{best['word']}")
            demo["file"] = str(run.path / chosen.save(run.dir).name)
        return {"model": lm.spec, "demo": demo, "plain": plain, "dev": list(select.dev),
                "candidates": scored}  # fmt: skip

    return execute_job(job, body, out, force)


def embed_train(
    model: LoadedModel | str | Path,
    config: ContrastiveConfig | None = None,
    data: TripletData | None = None,
    *,
    seed: int = 42,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Contrastive fine-tuning (InfoNCE with hard negatives, LoRA on every block linear,
    merged) of ``model`` in place on ``data``'s triplets, keeping the step with the best dev
    Spearman. With ``out``, the run holds ``model/``: safetensors that plain transformers
    loads, with ``prompt.json`` (the template and demonstration), which ``Embedder``,
    ``embed_encode`` and ``embed_eval`` reload.

    >>> result = embed_train("tiny:llama", ContrastiveConfig(steps=2, batch_size=4, rank=4,
    ...                      eval_every=1), TripletData(limit=8, dev_size=4), out="runs/emb",
    ...                      progress=False)
    >>> result["optimizer_steps"], result["best_step"] in (1, 2), result.run.name
    (2, True, 'emb')
    >>> Embedder(load_model("runs/emb")).encode("A dog runs.").shape
    (64,)
    """
    config = replace(config or ContrastiveConfig(), seed=seed)  # the call's seed is the config's
    data = data or TripletData()
    lm = resolve_model(model)
    triplets, dev = data.split()  # a bad pairs file fails before the run folder exists
    job = job_of("embed train", lm, seed, data=data, train=config)

    def body(run: Run | None) -> dict[str, Any]:
        metrics = train_contrastive(lm, triplets, dev, config, progress=progress)
        if run is not None:
            save_model(lm, run.dir / "model")
            PromptEOLConfig().save(run.dir / "model")  # trained without a demonstration
        return {"model": lm.spec, **metrics}

    return execute_job(job, body, out, force)
