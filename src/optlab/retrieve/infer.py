"""Inference with retrieved prompts (spec section 5) and the baselines that run beside it.

The pool of the training clusters is encoded with the prompt encoder into a FAISS
inner-product index (``IndexFlatIP``); a test input, encoded with the input encoder,
retrieves its K best prompts. They are cut to fit the context (n_tokens - the task's longest
question - its longest answer, dropping the least relevant first) and put in *reversed*
order, the best next to the input: ``p3 \\n p2 \\n p1 \\n input``. Multiple choice picks the
option with the lowest mean answer-token NLL; generation decodes greedily.

Baselines, on the same pool and test examples: ``zero`` (no prompt), ``random`` (K random
prompts), ``bm25`` (rank-bm25 over the prompts' words) and ``knn`` (the off-the-shelf MiniLM
encoder, cosine). Per task, every method gets a bootstrap 95% interval of its mean score.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from optlab.core.stats import bootstrap_ci
from optlab.errors import OptlabError
from optlab.eval.scorer import Scorer
from optlab.retrieve.retriever import encode, load_encoder, minilm_path
from optlab.retrieve.scoring import (
    answer_metric,
    generation_answers,
    lm_context,
    option_losses,
)
from optlab.retrieve.tasks import SEPARATOR, Example

METHODS = ("zero", "random", "bm25", "knn", "uprise")
INDEX_FILE = "index.faiss"


class PromptIndex:
    """An exact inner-product index over prompt embeddings (FAISS ``IndexFlatIP``).

    >>> index = PromptIndex(np.eye(3, dtype=np.float32))
    >>> index.search(np.array([[0.1, 0.9, 0.2]], dtype=np.float32), 2)
    [[1, 2]]
    """

    def __init__(self, vectors: np.ndarray | None = None, *, index: Any = None) -> None:
        import faiss

        if index is None:
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            index = faiss.IndexFlatIP(vectors.shape[1])
            index.add(vectors)
        self.index = index

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> list[list[int]]:
        """The ``k`` best rows per query, best first."""
        if k > len(self):
            raise OptlabError(f"--k {k} is more than the {len(self)} prompts in the pool")
        _, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return [[int(i) for i in row] for row in ids]

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))  # FAISS's own binary format, not a pickle

    @classmethod
    def load(cls, path: Path) -> PromptIndex:
        import faiss

        return cls(index=faiss.read_index(str(path)))


# --- the selectors: test inputs -> ranked pool indices, best first ----------------------------

Selector = Callable[[Sequence[Example], int], list[list[int]]]


def zero_selector(tests: Sequence[Example], k: int) -> list[list[int]]:
    """No prompt at all: the zero-shot baseline."""
    return [[] for _ in tests]


def random_selector(pool: Sequence[Example], seed: int) -> Selector:
    def select(tests: Sequence[Example], k: int) -> list[list[int]]:
        return [random.Random(f"{seed}/{e.uid}").sample(range(len(pool)), k) for e in tests]

    return select


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def bm25_selector(pool: Sequence[Example]) -> Selector:
    from rank_bm25 import BM25Okapi

    bm25 = BM25Okapi([_words(e.demonstration) for e in pool])

    def select(tests: Sequence[Example], k: int) -> list[list[int]]:
        ranked = []
        for e in tests:
            scores = bm25.get_scores(_words(e.input))
            ranked.append([int(i) for i in np.argsort(-scores, kind="stable")[:k]])
        return ranked

    return select


def dense_selector(query_encoder: Any, index: PromptIndex, *, normalize: bool) -> Selector:
    def select(tests: Sequence[Example], k: int) -> list[list[int]]:
        queries = encode(query_encoder, [e.input for e in tests])
        if normalize:
            queries /= np.linalg.norm(queries, axis=1, keepdims=True).clip(min=1e-12)
        return index.search(queries, k)

    return select


def knn_selector(pool: Sequence[Example], *, device: str = "cpu") -> Selector:
    """The off-the-shelf MiniLM: one encoder for inputs and prompts, cosine similarity."""
    encoder = load_encoder(minilm_path(), device=device)
    vectors = encode(encoder, [e.demonstration for e in pool])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
    return dense_selector(encoder, PromptIndex(vectors), normalize=True)


# --- prompting and evaluation -----------------------------------------------------------------


def prompt_budget(scorer: Scorer, tests: Sequence[Example]) -> int:
    """Tokens left for prompts: the context minus the longest question and the longest
    answer of these test examples."""
    question = max(len(scorer.encode(e.input)) for e in tests)
    answer = max(len(scorer.encode(a)) for e in tests for a in (e.choices or (e.target,)))
    return scorer.max_length - question - answer


def fit_prompts(scorer: Scorer, demos: Sequence[str], budget: int) -> list[str]:
    """The best-first prompts that fit in ``budget`` tokens (each with its separator);
    the least relevant go first."""
    kept, used = [], 0
    for demo in demos:
        cost = len(scorer.encode(demo + SEPARATOR))
        if used + cost > budget:
            break
        kept.append(demo)
        used += cost
    return kept


def answer_scores(
    scorer: Scorer, tests: Sequence[Example], contexts: Sequence[str], max_new_tokens: int
) -> list[float]:
    """Per test example: 1/0 for multiple choice (lowest mean answer-token NLL is gold),
    the task metric of the greedy answer for generation."""
    out = [0.0] * len(tests)
    choice = [i for i, e in enumerate(tests) if e.is_choice]
    if choice:
        losses = option_losses(scorer, [contexts[i] for i in choice], [tests[i] for i in choice])
        for i, loss in zip(choice, losses, strict=True):
            out[i] = float(min(range(len(loss)), key=loss.__getitem__) == tests[i].gold)
    generation = [i for i, e in enumerate(tests) if not e.is_choice]
    if generation:
        answers = generation_answers(scorer, [contexts[i] for i in generation], max_new_tokens)
        for i, answer in zip(generation, answers, strict=True):
            out[i] = answer_metric(answer, tests[i].target, tests[i].metric)
    return out


def evaluate_methods(
    scorer: Scorer,
    pool: Sequence[Example],
    tests: Sequence[Example],
    selectors: dict[str, Selector],
    *,
    k: int,
    max_new_tokens: int,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every method's mean score with its 95% interval, per test task and on average, and
    an example prompt of each method (for a look at what it retrieved)."""
    if k > len(pool):
        raise OptlabError(f"--k {k} is more than the {len(pool)} prompts in the pool")
    by_task: dict[str, list[Example]] = {}
    for e in tests:
        by_task.setdefault(e.task, []).append(e)
    results: dict[str, Any] = {"tasks": {}, "average": {}, "examples": {}}
    for task, examples in by_task.items():
        budget = prompt_budget(scorer, examples)
        row = results["tasks"].setdefault(task, {"n": len(examples)})
        for method, select in selectors.items():
            ranked = select(examples, k)
            prompts = [fit_prompts(scorer, [pool[i].demonstration for i in r], budget)
                       for r in ranked]  # fmt: skip
            contexts = [lm_context(p, e.input) for p, e in zip(prompts, examples, strict=True)]
            scores = answer_scores(scorer, examples, contexts, max_new_tokens)
            found = bootstrap_ci(scores, resamples=bootstrap, seed=seed)
            row[method] = {"mean": float(np.mean(scores)), "ci95": [found["low"], found["high"]],
                           "prompts": float(np.mean([len(p) for p in prompts]))}  # fmt: skip
            results["examples"].setdefault(method, contexts[0])
    for method in selectors:
        results["average"][method] = float(np.mean([r[method]["mean"] for r in
                                                    results["tasks"].values()]))  # fmt: skip
    return results
