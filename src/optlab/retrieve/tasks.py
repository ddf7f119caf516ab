"""UPRISE's tasks and clusters from shipped data, each with disjoint train / test splits.

A task is a list of :class:`Example` (an instruction-formatted input plus either answer
choices and a gold index, or a target text); its cluster is the task type the cross-task
protocol holds out (train the retriever on every other cluster, test on this one). The
instruction templates live in ``data/templates.json`` (plain data). Users add their own
tasks as ``mc:FILE.jsonl`` (``{"context", "choices", "gold"}`` lines, the format of
``optlab eval --tasks mc:FILE.jsonl``) or ``gen:FILE.jsonl`` (``{"context", "target"}``),
each with ``@CLUSTER`` to put it in a cluster (by default a cluster of its own, the file's
stem).

>>> tasks = shipped_tasks()
>>> sorted({t.cluster for t in tasks.values()})
['analogy', 'closed_qa', 'sentiment', 'topic', 'word_similarity']
"""

from __future__ import annotations

import functools
import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from optlab.core import data
from optlab.core.config import configurable, option, require, require_positive
from optlab.errors import OptlabError, did_you_mean
from optlab.eval.tasks import analogy_item, read_choice_items

SEPARATOR = " \n "  # between a demonstration and what follows it, as the official code
PAIR_GAP = 2.0  # word-similarity pairs compared only when their human scores differ this much


@dataclass(frozen=True)
class Example:
    """One instruction-formatted example. Multiple choice: ``choices`` (each starting with a
    space) and the ``gold`` index; generation: ``target`` (starting with a space), no choices.
    ``uid`` is unique over every task (``task/number``)."""

    uid: str
    task: str
    cluster: str
    input: str
    choices: tuple[str, ...] = ()
    gold: int = -1
    target: str = ""
    metric: str = "exact_match"  # generation only: exact_match or f1

    @property
    def is_choice(self) -> bool:
        return bool(self.choices)

    @property
    def answer(self) -> str:
        return self.choices[self.gold] if self.is_choice else self.target

    @property
    def demonstration(self) -> str:
        """The prompt this example becomes in the pool: question + answer."""
        return self.input + self.answer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Example:
        return cls(**{**row, "choices": tuple(row.get("choices", ()))})


@dataclass(frozen=True)
class Task:
    name: str
    cluster: str
    examples: tuple[Example, ...]

    @property
    def classification(self) -> bool:
        """Every example picks from the same labels (balanced splits keep their mix)."""
        return all(e.is_choice for e in self.examples) and len(
            {e.choices for e in self.examples}) == 1  # fmt: skip


@functools.cache
def templates() -> dict[str, dict[str, str]]:
    text = resources.files("optlab.retrieve").joinpath("data/templates.json").read_text("utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def _task(name: str, rows: list[tuple[dict[str, str], tuple[str, ...], int | str]]) -> Task:
    """A shipped task from (template fields, choices, gold index or target text) rows."""
    spec = templates()[name]
    examples = []
    for i, (fields, choices, answer) in enumerate(rows):
        text = spec["input"].format(**fields)
        common = {"uid": f"{name}/{i}", "task": name, "cluster": spec["cluster"], "input": text}
        if spec["kind"] == "mc":
            examples.append(Example(**common, choices=choices, gold=int(answer)))
        else:
            examples.append(Example(**common, target=f" {answer}", metric=spec["metric"]))
    return Task(name, spec["cluster"], tuple(examples))


def _countries() -> list[Task]:
    records = [r for r in data.country_records() if r.get("capital") and r.get("region")]
    regions = tuple(f" {r}" for r in sorted({r["region"] for r in records}))
    capital = [({"country": r["name"]}, (), r["capital"]) for r in records]
    region = [({"country": r["name"]}, regions, regions.index(f" {r['region']}"))
              for r in records]  # fmt: skip
    return [_task("country_capital", capital), _task("country_region", region)]


def _analogies() -> list[Task]:
    rng = random.Random(42)
    rows: dict[str, list] = {"analogy_semantic": [], "analogy_syntactic": []}
    for section, questions in data.analogy_questions().items():
        answers = sorted({q[3] for q in questions})
        kind = "analogy_syntactic" if section.startswith("gram") else "analogy_semantic"
        # 100 per section: the sections differ by 10x in size and would swamp each other.
        for question in rng.sample(questions, min(100, len(questions))):
            item = analogy_item(question, answers, rng)
            a, b, c, _ = question
            rows[kind].append(({"a": a, "b": b, "c": c}, item.choices, item.gold))
    return [_task(name, r) for name, r in rows.items()]


def _polarity() -> Task:
    labels = (" negative", " positive")
    return _task("polarity", [({"text": s.text}, labels, s.label)
                              for s in data.sentiment_sentences()])  # fmt: skip


def _word_similarity(name: str) -> Task:
    """Pairs of word pairs whose human scores differ by at least ``PAIR_GAP`` (0-10 scale):
    which pair is more similar, A or B. Each pair of words appears in one question."""
    pairs = data.word_pairs(name)
    rng = random.Random(42)
    rng.shuffle(pairs)
    rows, used = [], set()
    for i, first in enumerate(pairs):
        if i in used:
            continue
        for j in range(i + 1, len(pairs)):
            if j not in used and abs(pairs[j].score - first.score) >= PAIR_GAP:
                used |= {i, j}
                a, b = (first, pairs[j]) if rng.random() < 0.5 else (pairs[j], first)
                fields = {"a1": a.word1, "a2": a.word2, "b1": b.word1, "b2": b.word2}
                rows.append((fields, (" A", " B"), int(b.score > a.score)))
                break
    return _task(name, rows)


def _newsgroups() -> Task:
    labels = (" religion", " space")
    rows = [({"subject": p.subject.removeprefix("Re: "), "body": p.body[:300]}, labels,
             int(p.group == "sci.space")) for p in data.newsgroup_posts()]  # fmt: skip
    return _task("newsgroups", rows)


@functools.cache
def shipped_tasks() -> dict[str, Task]:
    """Every shipped task by name (built once per process)."""
    tasks = [*_countries(), *_analogies(), _polarity(), _word_similarity("wordsim353"),
             _word_similarity("simlex999"), _newsgroups()]  # fmt: skip
    return {t.name: t for t in tasks}


def user_task(spec: str) -> Task:
    """``mc:FILE.jsonl[@CLUSTER]`` or ``gen:FILE.jsonl[@CLUSTER]`` as a task named after the
    file's stem; contexts are used as given (they are the instruction-formatted input)."""
    kind, _, rest = spec.partition(":")
    target, _, cluster = rest.partition("@")
    if kind not in ("mc", "gen") or not target:
        raise OptlabError(f"task {spec!r}: give mc:FILE.jsonl or gen:FILE.jsonl, optionally "
                          "with @CLUSTER")  # fmt: skip
    path = Path(target).expanduser()
    name = path.stem
    cluster = cluster or name
    examples = []
    if kind == "mc":
        for i, item in enumerate(read_choice_items(path)):
            examples.append(Example(f"{name}/{i}", name, cluster, item.context,
                                    tuple(item.choices), item.gold))  # fmt: skip
    else:
        for number, row in data.read_jsonl(path):
            if not (isinstance(row, dict) and isinstance(row.get("context"), str)
                    and isinstance(row.get("target"), str)):  # fmt: skip
                raise OptlabError(f"{path}:{number}: expected {{'context', 'target'}} strings")
            target_text = row["target"] if row["target"].startswith(" ") else " " + row["target"]
            examples.append(Example(f"{name}/{number}", name, cluster, row["context"],
                                    target=target_text, metric="f1"))  # fmt: skip
    if len(examples) < 2:
        raise OptlabError(f"{path}: a task needs at least 2 examples (a train and a test one)")
    return Task(name, cluster, tuple(examples))


def _balanced(examples: list[Example], n: int) -> list[Example]:
    """Up to ``n`` examples taking the labels in turn (the order within a label kept)."""
    by_label: dict[int, list[Example]] = defaultdict(list)
    for e in examples:
        by_label[e.gold].append(e)
    queues = [by_label[label] for label in sorted(by_label)]
    picked: list[Example] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


def split_task(task: Task, *, pool_size: int, test_size: int, seed: int) -> tuple[list, list]:
    """Disjoint (train, test) examples: a seeded shuffle, the test part first (at most half
    of the task), class-balanced for classification; inputs that repeat are kept once, so no
    test input is also a training input."""
    unique = list({e.input: e for e in task.examples}.values())
    random.Random(f"{seed}/{task.name}").shuffle(unique)
    n_test = min(test_size, len(unique) // 2)
    take = _balanced if task.classification else (lambda xs, n: xs[:n])
    test = take(unique, n_test)
    chosen = {e.uid for e in test}
    train = take([e for e in unique if e.uid not in chosen], pool_size)
    return train, test


@configurable("uprise_data")
@dataclass(frozen=True)
class TaskSplit:
    """Which cluster to hold out, the users' own tasks, and the split sizes.

    >>> TaskSplit(hold_out="sentiment").clusters()["sentiment"]
    ('polarity',)
    """

    hold_out: str = option("sentiment", "the cluster the retriever never sees: it is tested "
                           "on it (closed_qa, analogy, sentiment, word_similarity, topic, or "
                           "your own)", metavar="CLUSTER")  # fmt: skip
    tasks: tuple[str, ...] = option((), "your own tasks: mc:FILE.jsonl or gen:FILE.jsonl, each "
                                    "optionally @CLUSTER", flag="--task-files",
                                    metavar="SPEC,...")  # fmt: skip
    only: tuple[str, ...] = option((), "use only these shipped tasks (default: all)",
                                   metavar="TASK,...")  # fmt: skip
    pool_size: int = option(10_000, "training examples per task (the pool; the paper's cap)")
    test_size: int = option(100, "test examples per task (at most half of a task)")
    split_seed: int = option(42, "seed of the splits (the paper's 42)")

    def __post_init__(self) -> None:
        for name in ("tasks", "only"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, tuple(v for v in value.split(",") if v))
        require_positive(self, "pool_size", "test_size")
        for name in self.only:
            if name not in templates():
                raise did_you_mean("task", name, templates())
        clusters = self.clusters()
        if self.hold_out not in clusters:
            raise did_you_mean("cluster", self.hold_out, clusters)
        require(len(clusters) >= 2, "the cross-task protocol needs a second cluster to train on")

    def all_tasks(self) -> dict[str, Task]:
        shipped = shipped_tasks()
        chosen = {n: t for n, t in shipped.items() if not self.only or n in self.only}
        for spec in self.tasks:
            task = user_task(spec)
            if task.name in chosen:
                raise OptlabError(f"task file {spec!r}: a task named {task.name!r} exists "
                                  "already; rename the file")  # fmt: skip
            chosen[task.name] = task
        return chosen

    def clusters(self) -> dict[str, tuple[str, ...]]:
        """Cluster -> its task names (the users' files are read here: bad ones fail early)."""
        out: dict[str, list[str]] = defaultdict(list)
        for name, task in self.all_tasks().items():
            out[task.cluster].append(name)
        return {c: tuple(v) for c, v in sorted(out.items())}

    def build(self) -> Splits:
        """The pool (train splits of every cluster but the held-out one) and the test
        examples (test splits of the held-out cluster's tasks)."""
        pool, test = [], []
        for task in self.all_tasks().values():
            train, held = split_task(task, pool_size=self.pool_size, test_size=self.test_size,
                                     seed=self.split_seed)  # fmt: skip
            if task.cluster == self.hold_out:
                test += held
            else:
                pool += train
        return Splits(self.hold_out, pool, test)


@dataclass
class Splits:
    """What a run works on: the prompt pool of the training clusters and the held-out test
    examples. Saved as ``tasks.json`` so every later stage reads the same examples."""

    hold_out: str
    pool: list[Example]
    test: list[Example]

    def __post_init__(self) -> None:
        leaked = {e.uid for e in self.pool if e.cluster == self.hold_out}
        if leaked:  # the protocol's one promise: checked wherever splits are made or read
            raise OptlabError(f"the pool holds {len(leaked)} examples of the held-out cluster "
                              f"{self.hold_out!r} (e.g. {sorted(leaked)[0]})")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"hold_out": self.hold_out, "pool": [e.to_dict() for e in self.pool],
                "test": [e.to_dict() for e in self.test]}  # fmt: skip

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Splits:
        return cls(raw["hold_out"], [Example.from_dict(r) for r in raw["pool"]],
                   [Example.from_dict(r) for r in raw["test"]])  # fmt: skip

    def by_task(self) -> dict[str, list[Example]]:
        out: dict[str, list[Example]] = defaultdict(list)
        for e in self.pool:
            out[e.task].append(e)
        return dict(out)
