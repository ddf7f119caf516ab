"""Mining on a hand-made score table, the retrieval loss against a direct computation, the
index's top-K, the reversed prompt format and the truncation to fit the context."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from optlab.core.models import load_model
from optlab.core.stats import bootstrap_ci
from optlab.eval.scorer import Scorer
from optlab.retrieve.infer import (
    PromptIndex,
    bm25_selector,
    fit_prompts,
    random_selector,
)
from optlab.retrieve.mining import mine
from optlab.retrieve.retriever import RetrieverConfig, batch_texts, retrieval_loss
from optlab.retrieve.scoring import lm_context
from optlab.retrieve.tasks import Example


def _row(uid: str, task: str, scored: list[tuple[str, float, float]]) -> dict:
    return {"uid": uid, "task": task, "candidates": [{"uid": u, "score": s, "acc": a}
                                                     for u, s, a in scored]}  # fmt: skip


def test_mining_on_a_hand_made_table() -> None:
    table = {
        # best score t/1 has acc 0: the positive is the best *correct* one, t/2
        "t/0": _row(
            "t/0",
            "t",
            [
                ("t/1", 0.1, 0.0),
                ("t/2", 0.3, 1.0),
                ("t/3", 0.5, 1.0),
                ("t/4", 0.7, 0.0),
                ("t/5", 0.9, 0.0),
            ],
        ),
        "t/1": _row("t/1", "t", [("t/0", 0.2, 0.0), ("t/2", 0.4, 0.0)]),  # no positive: dropped
        "u/0": _row("u/0", "u", [("u/1", 0.6, 1.0)]),  # its only candidate: no hard negative
    }
    pool = {"t": [f"t/{i}" for i in range(6)], "u": ["u/0", "u/1"], "v": ["v/0", "v/1", "v/2"]}
    records = mine(table, pool_uids=pool, hard=2, random_negatives=3, seed=0)
    assert [r["uid"] for r in records] == ["t/0", "u/0"]
    first, second = records
    assert first["positive"] == "t/2" and first["hard"] == ["t/5", "t/4"]
    assert len(first["random"]) == 3 and all(u[0] in "uv" for u in first["random"])
    assert second["positive"] == "u/1" and second["hard"] == []
    assert all(u[0] in "tv" for u in second["random"])
    assert records == mine(table, pool_uids=pool, hard=2, random_negatives=3, seed=0)


def test_the_loss_is_cross_entropy_over_every_prompt_in_the_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    q, p = torch.randn(3, 5, generator=gen), torch.randn(9, 5, generator=gen)
    positives = torch.tensor([0, 3, 6])
    direct = 0.0
    for i in range(3):
        scores = [float(q[i] @ p[j]) for j in range(9)]
        direct += -(scores[positives[i]] - math.log(sum(math.exp(s) for s in scores)))
    assert retrieval_loss(q, p, positives).item() == pytest.approx(direct / 3, rel=1e-5)


def test_a_batch_holds_each_positive_then_its_negatives() -> None:
    records = [{"uid": "a", "positive": "p1", "hard": ["h1", "h2"], "random": ["r1", "r2"]},
               {"uid": "b", "positive": "p2", "hard": ["h3"], "random": ["r3"]}]  # fmt: skip
    text = {"a": "qa", "b": "qb"}
    demo = {u: u.upper() for u in ["p1", "p2", "h1", "h2", "h3", "r1", "r2", "r3"]}
    config = RetrieverConfig(batch_hard=1, batch_random=1)
    queries, prompts, positives = batch_texts(records, text, demo, config, None)
    assert queries == ["qa", "qb"] and prompts == ["P1", "H1", "R1", "P2", "H3", "R3"]
    assert positives.tolist() == [0, 3]
    _, drawn, _ = batch_texts(records, text, demo, config, random.Random(0))
    assert drawn[0] == "P1" and drawn[1] in ("H1", "H2") and drawn[2] in ("R1", "R2")


def test_the_index_returns_the_true_top_k() -> None:
    rng = np.random.default_rng(0)
    pool, queries = rng.normal(size=(50, 8)).astype("f4"), rng.normal(size=(4, 8)).astype("f4")
    found = PromptIndex(pool).search(queries, 3)
    assert found == np.argsort(-(queries @ pool.T), axis=1)[:, :3].tolist()


def test_prompts_are_reversed_so_the_best_is_next_to_the_input() -> None:
    assert lm_context(["p1", "p2", "p3"], "input") == "p3 \n p2 \n p1 \n input"
    assert lm_context([], "input") == "input"


def test_prompts_are_cut_to_fit_least_relevant_first() -> None:
    scorer = Scorer(load_model("tiny:llama"), progress=False)  # byte tokens: 1 per character
    demos = ["a" * 40, "b" * 40, "c" * 40]
    assert fit_prompts(scorer, demos, 3 * 43) == demos  # each costs 40 + 3 separator bytes
    assert fit_prompts(scorer, demos, 2 * 43 + 10) == demos[:2]
    assert fit_prompts(scorer, demos, 10) == []


def test_bm25_and_random_baselines() -> None:
    pool = [Example(f"t/{i}", "t", "c", text, (" a", " b"), 0) for i, text in
            enumerate(["the cat sat", "rockets reach orbit", "a dog barks"])]  # fmt: skip
    query = Example("q/0", "q", "d", "rockets and orbit?", (" a", " b"), 0)
    assert bm25_selector(pool)([query], 1) == [[1]]
    picked = random_selector(pool, 0)([query], 2)[0]
    assert len(set(picked)) == 2 and picked == random_selector(pool, 0)([query], 2)[0]


def test_bootstrap_interval_brackets_the_mean() -> None:
    values = [1.0] * 30 + [0.0] * 70
    found = bootstrap_ci(values, resamples=500)
    low, high = found["low"], found["high"]
    assert low < 0.3 < high and high - low < 0.25
    same = bootstrap_ci([1.0] * 5, resamples=100)
    assert (same["low"], same["high"]) == (1.0, 1.0)
