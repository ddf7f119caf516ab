"""Named evaluation tasks: ``ppl:<corpus>`` and ``mc:<task>`` (plus local files), and tasks
other packages register by prefix (``unlearn:RUN``, the unlearning metric suite on the data
sets of an unlearning run, is :mod:`optlab.unlearning`'s).

A task takes a :class:`Scorer` and returns flat metrics. ``ppl:wiki`` scores the held-out
Wikipedia part; ``ppl:FILE.txt`` any local text; ``mc:sentiment`` and ``mc:analogy`` are
multiple-choice tasks on shipped data; ``mc:FILE.jsonl`` reads
``{"context": ..., "choices": [...], "gold": i}`` lines.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optlab.core import data, hooks
from optlab.core.config import Registry, configurable, option, require_positive
from optlab.errors import OptlabError
from optlab.eval.perplexity import perplexity
from optlab.eval.scorer import Scorer

Task = Callable[..., dict[str, Any]]
TASKS: Registry[Task] = Registry("task")
# ``PREFIX:ARG`` tasks: the factory turns ARG into the task (or raises an OptlabError).
TaskFactory = Callable[[str], Task]
PREFIXES: Registry[TaskFactory] = Registry("task prefix")


def register_prefix(prefix: str) -> Callable[[TaskFactory], TaskFactory]:
    """Register the tasks named ``prefix:ARG``; the packages that define them call this when
    imported (named in :mod:`optlab.plugins`, so a fresh process finds them).

    >>> @register_prefix("unlearn")
    ... def unlearn_task(run: str) -> Task: ...
    """
    return PREFIXES.register(prefix)


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    gold: int


def multiple_choice(scorer: Scorer, items: list[ChoiceItem]) -> dict[str, float | int]:
    """Accuracy by log-likelihood of each choice (``acc``) and per byte (``acc_norm``),
    as lm-evaluation-harness computes them."""
    if not items:
        raise OptlabError("a multiple-choice task needs at least one item")
    requests = [(item.context, choice) for item in items for choice in item.choices]
    scores = iter(scorer.loglikelihood(requests))
    correct = correct_norm = 0
    for item in items:
        logprobs = [next(scores)[0] for _ in item.choices]
        per_byte = [
            lp / max(1, len(c.encode())) for lp, c in zip(logprobs, item.choices, strict=True)
        ]
        correct += max(range(len(logprobs)), key=logprobs.__getitem__) == item.gold
        correct_norm += max(range(len(per_byte)), key=per_byte.__getitem__) == item.gold
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items)}


def _ppl_task(corpus: str) -> Task:
    def task(scorer: Scorer, *, limit: int | None = None, seq_len: int | None = None) -> dict:
        return perplexity(scorer, data.load_text(corpus), seq_len=seq_len, limit=limit).to_dict()

    return task


for _corpus in ("wiki", "book", "code"):
    # ppl:wiki scores the held-out part only; wiki:calib is for calibration.
    TASKS.register(f"ppl:{_corpus}")(_ppl_task("wiki:eval" if _corpus == "wiki" else _corpus))


@TASKS.register("mc:sentiment")
def sentiment(scorer: Scorer, *, limit: int | None = None, **_: Any) -> dict:
    """Movie-review polarity (Pang & Lee sentences) as a two-way choice."""
    sentences = data.sentiment_sentences()
    random.Random(0).shuffle(sentences)
    items = [
        ChoiceItem(f"Review: {s.text}\nSentiment:", (" negative", " positive"), s.label)
        for s in sentences[:limit]
    ]
    return multiple_choice(scorer, items)


def analogy_item(
    question: tuple[str, str, str, str], answers: list[str], rng: random.Random
) -> ChoiceItem:
    """One analogy (a : b :: c : ?) with the true answer and three distractors drawn from
    ``answers`` (the answers of its section), in a random order."""
    a, b, c, d = question
    choices = [d, *rng.sample([x for x in answers if x != d], 3)]
    rng.shuffle(choices)
    return ChoiceItem(f"{a} is to {b} as {c} is to", tuple(f" {x}" for x in choices),
                      choices.index(d))  # fmt: skip


@TASKS.register("mc:analogy")
def analogy(scorer: Scorer, *, limit: int | None = None, **_: Any) -> dict:
    """Word analogies (a : b :: c : ?) with four candidate answers from the same section."""
    rng = random.Random(0)
    items = []
    for questions in data.analogy_questions().values():
        answers = sorted({q[3] for q in questions})
        for question in rng.sample(questions, min(len(questions), 50)):
            items.append(analogy_item(question, answers, rng))
    rng.shuffle(items)
    return multiple_choice(scorer, items[:limit])


PROMPTS = ("The capital of France is", "The chemical symbol for gold is")


@TASKS.register("gen:facts")
def facts(scorer: Scorer, *, limit: int | None = None, **_: Any) -> dict:
    """Greedy completions of a few factual prompts (to the end of the line): a look at what
    a compressed model still says."""
    prompts = list(PROMPTS[:limit])
    completions = scorer.generate(prompts, max_new_tokens=12, until=["\n"])
    return {"n": len(prompts), "samples": dict(zip(prompts, completions, strict=True))}


def read_choice_items(path: Path) -> list[ChoiceItem]:
    """The items of a ``{"context", "choices", "gold"}`` JSON Lines file; a line that lacks a
    field or has a gold index that is not a choice is named in the error."""
    items = []
    for number, row in data.read_jsonl(path):
        try:
            item = ChoiceItem(row["context"], tuple(row["choices"]), int(row["gold"]))
        except (ValueError, KeyError, TypeError) as err:
            raise OptlabError(
                f"{path}:{number}: expected {{'context', 'choices', 'gold'}} ({err})"
            ) from err
        if not 0 <= item.gold < len(item.choices):
            raise OptlabError(f"{path}:{number}: gold {item.gold} is not a choice index")
        items.append(item)
    return items


def _choice_file(path: Path) -> Task:
    def task(scorer: Scorer, *, limit: int | None = None, **_: Any) -> dict:
        return multiple_choice(scorer, read_choice_items(path)[:limit])

    return task


def get_task(name: str) -> Task:
    """A registered task, ``ppl:``/``mc:`` applied to a local file, or a prefix task such as
    ``unlearn:RUN``."""
    kind, _, target = name.partition(":")
    if name not in TASKS:  # perhaps a prefix of a package this process has not imported yet
        hooks.import_plugins(hooks.EVAL_TASKS)
    if kind in PREFIXES:
        return PREFIXES.get(kind)(target)
    if name not in TASKS and kind in ("ppl", "mc") and ("/" in target or "." in target):
        path = Path(target).expanduser()
        if path.is_dir():
            raise OptlabError(f"task {name!r}: {target!r} is a folder, not a file")
        if not path.is_file():
            raise OptlabError(f"task {name!r}: no such file {target!r}")
        if kind == "ppl":
            return _ppl_task(str(path))
        return _choice_file(path)
    return TASKS.get(name)


def run_tasks(scorer: Scorer, names: list[str], **options: Any) -> dict[str, dict[str, Any]]:
    """Run several tasks; names are checked before any work starts."""
    tasks = {name: get_task(name) for name in names}
    return {name: task(scorer, **options) for name, task in tasks.items()}


@configurable("tasks")
@dataclass(frozen=True)
class TaskEval:
    """Which tasks to run and how much of each.

    >>> TaskEval(tasks=("ppl:wiki", "mc:sentiment"), limit=40, items=100, seq_len=512)
    TaskEval(tasks=('ppl:wiki', 'mc:sentiment'), limit=40, items=100, seq_len=512, batch_size=8,
             compile=False)
    """

    def limit_of(self, task: str) -> int | None:
        """Perplexity tasks keep ``limit`` windows; the others ``items`` items (or ``limit``)."""
        if task.startswith("ppl:") or self.items is None:
            return self.limit
        return self.items

    tasks: tuple[str, ...] = option(("ppl:wiki",), "comma-separated tasks", metavar="T1,T2")
    limit: int | None = option(None, "first N windows / items per task")
    items: int | None = option(None, "first N items of the non-perplexity tasks (default: "
                               "--limit)")  # fmt: skip
    seq_len: int | None = option(None, "perplexity window (default: the model's context)")
    batch_size: int = option(8, "sequences per forward pass")
    compile: bool = option(False, "generation tasks: run the one-token decoding step through "
                           "torch.compile (compiling takes a minute or more, once per batch "
                           "shape; then each token is faster, packed models most); without a "
                           "C++ compiler, a warning and plain decoding")  # fmt: skip

    def __post_init__(self) -> None:
        tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
        object.__setattr__(self, "tasks", tuple(t.strip() for t in tasks if t.strip()))
        if not self.tasks:
            raise OptlabError("--tasks is empty; e.g. --tasks ppl:wiki,mc:sentiment")
        require_positive(self, "limit", "items", "seq_len", "batch_size")
        for name in self.tasks:
            get_task(name)  # a bad name fails here, before any model is loaded
