"""LLM scoring (spec section 2) against a direct computation, and its resumable cache."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from optlab.core.models import load_model
from optlab.eval.scorer import Scorer
from optlab.retrieve.scoring import (
    ScoreConfig,
    answer_metric,
    sample_candidates,
    score_examples,
    score_pairs,
    share,
)
from optlab.retrieve.tasks import Example


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny:llama", seed=0)


def _pool(n: int = 6, task: str = "t") -> list[Example]:
    return [Example(f"{task}/{i}", task, "c", f"Is {i} even?", (" no", " yes"), int(i % 2 == 0))
            for i in range(n)]  # fmt: skip


def _mean_nll(lm, context: str, option: str) -> float:
    """Mean NLL of the option's tokens, straight from the model's logits."""
    tok = lm.tokenizer
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    full = tok(context + option, add_special_tokens=False)["input_ids"]
    n = len(full) - len(ctx)
    with torch.no_grad():
        logits = lm.model(torch.tensor([full])).logits[0]
    logprobs = F.log_softmax(logits[len(full) - n - 1 : len(full) - 1].float(), -1)
    return -logprobs.gather(1, torch.tensor(full[-n:])[:, None]).mean().item()


def test_choice_score_is_gold_loss_over_the_sum_of_option_losses(lm) -> None:
    example = Example("t/9", "t", "c", "Question: is the sky blue?\nAnswer:",
                      (" no", " yes", " maybe not"), 1)  # fmt: skip
    demo = "Question: is grass green?\nAnswer: yes"
    [(score, acc)] = score_pairs(Scorer(lm, progress=False), [demo], [example], 4)
    context = demo + " \n " + example.input  # the spec's LM input
    losses = [_mean_nll(lm, context, option) for option in example.choices]
    assert score == pytest.approx(losses[1] / sum(losses), rel=1e-4)
    assert acc == float(min(range(3), key=losses.__getitem__) == 1)


def test_generation_score_is_one_minus_the_metric(lm) -> None:
    example = Example("g/0", "g", "c", "Capital of France:", target=" Paris")
    scorer = Scorer(lm, progress=False)
    [(score, acc)] = score_pairs(scorer, ["Capital of Spain: Madrid"], [example], 5)
    answer = scorer.generate(["Capital of Spain: Madrid \n Capital of France:"], until=["\n"],
                             max_new_tokens=5)[0]  # fmt: skip
    metric = answer_metric(answer, " Paris", "exact_match")
    assert (score, acc) == (1 - metric, metric)
    assert answer_metric(" The Paris!", "Paris", "exact_match") == 1.0
    assert answer_metric("new york city", "york", "f1") == pytest.approx(0.5)


def test_candidates_come_from_the_same_task_never_the_example_itself() -> None:
    pool = {"t": _pool(60), "u": _pool(5, "u")}
    target = pool["t"][3]
    drawn = sample_candidates(pool, target, 50, seed=0)
    assert len(drawn) == 50 == len({e.uid for e in drawn})
    assert all(e.task == "t" and e.uid != target.uid for e in drawn)
    assert drawn == sample_candidates(pool, target, 50, seed=0)  # seeded per example
    assert len(sample_candidates(pool, pool["u"][0], 50, seed=0)) == 4  # a small pool: all


@pytest.mark.parametrize(("n", "world"), [(10, 3), (2, 4), (9, 1)])
def test_process_shares_cover_every_example_once(n: int, world: int) -> None:
    covered = [i for rank in range(world) for i in share(n, rank, world)]
    assert covered == list(range(n))


def test_an_interrupted_scoring_resumes_from_its_cache(lm, tmp_path) -> None:
    pool = _pool(6)
    config = ScoreConfig(candidates=3, chunk=2)
    scorer = Scorer(lm, progress=False)
    full = score_examples(scorer, pool, {"t": pool}, config, cache=tmp_path)
    assert all([c["score"] for c in r["candidates"]] == sorted(c["score"] for c in
               r["candidates"]) for r in full.values())  # fmt: skip
    cache = tmp_path / "scores-0.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:4]) + '\n{"uid": "t/4", "tor')  # killed mid-line
    calls = []
    original = scorer.score_tokens
    scorer.score_tokens = lambda requests, desc="": calls.append(len(requests)) or original(
        requests, desc)  # fmt: skip
    resumed = score_examples(scorer, pool, {"t": pool}, config, cache=tmp_path)
    assert sum(calls) == 2 * 3 * 2  # 2 examples x 3 candidates x 2 options: only the rest
    assert json.dumps(resumed, sort_keys=True) == json.dumps(full, sort_keys=True)


def test_the_chunk_size_does_not_change_the_scores(lm) -> None:
    # A larger chunk batches more prompts together (their shared prefixes run once): the
    # same rankings and scores, up to float summation order.
    pool = _pool(6)
    scorer = Scorer(lm, progress=False)
    one, six = (score_examples(scorer, pool, {"t": pool}, ScoreConfig(candidates=4, chunk=c))
                for c in (1, 6))  # fmt: skip
    assert list(one) == list(six)
    for uid, row in one.items():
        mine = {c["uid"]: c for c in row["candidates"]}
        other = {c["uid"]: c for c in six[uid]["candidates"]}
        assert sorted(mine) == sorted(other) and len(mine) == 4
        for c in mine:
            assert mine[c]["acc"] == other[c]["acc"]
            assert mine[c]["score"] == pytest.approx(other[c]["score"], rel=1e-5)


def test_two_processes_shares_merge_into_the_one_process_table(lm, tmp_path) -> None:
    pool = _pool(5)
    config = ScoreConfig(candidates=2)
    scorer = Scorer(lm, progress=False)
    alone = score_examples(scorer, pool, {"t": pool}, config)
    for rank in (0, 1):  # as two `accelerate launch` processes, each writing its own file
        score_examples(scorer, pool, {"t": pool}, config, cache=tmp_path, rank=rank, world=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores-0.jsonl", "scores-1.jsonl"]
    merged = score_examples(scorer, [], {"t": pool}, config, cache=tmp_path)
    assert json.dumps(merged, sort_keys=True) == json.dumps(alone, sort_keys=True)
