"""Tasks, clusters and splits: disjoint, balanced, the held-out cluster never in the pool."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from optlab.errors import OptlabError
from optlab.retrieve.tasks import (
    Example,
    Splits,
    TaskSplit,
    shipped_tasks,
    split_task,
    templates,
    user_task,
)


def test_at_least_four_clusters_from_shipped_data() -> None:
    tasks = shipped_tasks()
    clusters = {t.cluster for t in tasks.values()}
    assert len(clusters) >= 4 and set(tasks) == set(templates())
    for task in tasks.values():
        assert len(task.examples) >= 50, task.name
        for e in task.examples[:20]:
            assert e.answer.startswith(" ") and e.demonstration == e.input + e.answer


@pytest.mark.parametrize("name", sorted(templates()))
def test_splits_are_disjoint_seeded_and_balanced(name: str) -> None:
    task = shipped_tasks()[name]
    train, test = split_task(task, pool_size=10_000, test_size=40, seed=42)
    assert not {e.uid for e in train} & {e.uid for e in test}
    assert not {e.input for e in train} & {e.input for e in test}
    again = split_task(task, pool_size=10_000, test_size=40, seed=42)
    assert [e.uid for e in again[1]] == [e.uid for e in test]
    assert [e.uid for e in split_task(task, pool_size=10_000, test_size=40, seed=1)[1]] != [
        e.uid for e in test]  # fmt: skip
    if task.classification:  # each label as often as the others (one more at most)
        counts = Counter(e.gold for e in test)
        labels = len(task.examples[0].choices)
        if all(counts[g] < sum(e.gold == g for e in task.examples) for g in range(labels)):
            assert max(counts.values()) - min(counts.values()) <= 1, counts


@pytest.mark.parametrize("hold_out", ["closed_qa", "analogy", "sentiment", "word_similarity",
                                      "topic"])  # fmt: skip
def test_the_held_out_cluster_never_leaks_into_the_pool(hold_out: str) -> None:
    splits = TaskSplit(hold_out=hold_out, pool_size=30, test_size=10).build()
    assert splits.test and all(e.cluster == hold_out for e in splits.test)
    assert splits.pool and all(e.cluster != hold_out for e in splits.pool)
    held_tasks = {e.task for e in splits.test}
    assert not held_tasks & {e.task for e in splits.pool}
    # A tampered tasks.json that puts a held-out example in the pool is refused on reading.
    raw = splits.to_dict()
    raw["pool"].append(raw["test"][0])
    with pytest.raises(OptlabError, match="held-out cluster"):
        Splits.from_dict(json.loads(json.dumps(raw)))


def test_unknown_cluster_gets_did_you_mean() -> None:
    with pytest.raises(OptlabError, match="Did you mean 'sentiment'"):
        TaskSplit(hold_out="sentimnt")


def test_users_tasks_join_a_cluster(tmp_path) -> None:
    mc = tmp_path / "quiz.jsonl"
    mc.write_text("".join(json.dumps({"context": f"Q{i}: 2+{i}=", "choices": [" 4", " 5"],
                                      "gold": i % 2}) + "\n" for i in range(6)))  # fmt: skip
    gen = tmp_path / "facts.jsonl"
    gen.write_text("".join(json.dumps({"context": f"Fact {i}:", "target": f"answer {i}"}) + "\n"
                           for i in range(6)))  # fmt: skip
    split = TaskSplit(hold_out="mine", tasks=(f"mc:{mc}@mine", f"gen:{gen}"), only=("polarity",),
                      pool_size=4, test_size=2)  # fmt: skip
    assert split.clusters() == {"facts": ("facts",), "mine": ("quiz",), "sentiment": ("polarity",)}
    splits = split.build()
    assert {e.task for e in splits.test} == {"quiz"}
    facts = [e for e in splits.pool if e.task == "facts"]
    assert facts and all(not e.is_choice and e.target.startswith(" answer") for e in facts)


def test_a_choice_file_without_gold_is_named(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "Q", "choices": [" a", " b"]}) + "\n")
    with pytest.raises(OptlabError, match=r"bad.jsonl:1: .*'gold'"):
        user_task(f"mc:{bad}")


def test_examples_round_trip_through_json() -> None:
    e = shipped_tasks()["polarity"].examples[0]
    assert Example.from_dict(json.loads(json.dumps(e.to_dict()))) == e
