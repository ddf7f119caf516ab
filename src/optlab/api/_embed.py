"""Sentence embeddings: ``embed_encode``, ``embed_eval`` and ``embed_train`` (PromptEOL)."""

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
from optlab.embed.contrastive import ContrastiveConfig, train_contrastive
from optlab.embed.prompteol import Embedder, PromptEOLConfig
from optlab.embed.sts import STSEval, sts_pairs, sts_spearman
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
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Spearman (x 100) of PromptEOL cosine similarities with human scores on each STS set
    (the shipped Lee documents, WordSim-353, SimLex-999, or your STS-B / SICK file).

    >>> result = embed_eval(load_model("tiny:llama"), STSEval(sts=("wordsim353",), limit=20),
    ...                     progress=False)
    >>> result["sts"]["wordsim353"]["pairs"]
    20
    """
    sts = sts or STSEval()
    config = config or PromptEOLConfig()
    lm = resolve_model(model)
    sets = {name: sts_pairs(name)[: sts.limit] for name in sts.sts}  # bad files fail first
    job = job_of("embed eval", lm, seed, sts=sts, prompt=config)

    def body(run: Run | None) -> dict[str, Any]:
        embedder = Embedder(lm, config)
        scores: dict[str, Any] = {}
        for name, pairs in sets.items():
            bar = None if progress else False  # None: a bar on a terminal only
            scores[name] = {"spearman": sts_spearman(embedder, pairs, bar), "pairs": len(pairs)}
            log.info("%s: Spearman x100 %.2f (%d pairs)", name, scores[name]["spearman"],
                     len(pairs))  # fmt: skip
        return {"model": lm.spec, "sts": scores, "dimension": embedder.dimension}

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
