"""Two demo scenarios built from shipped data (the papers' data sets are not obtainable
offline), plus the user's own files; :class:`UnlearnData` names either.

- ``facts``: questions about the countryinfo records (capital, ISO currency code),
  kept only where the model answers correctly before unlearning; whole countries go to the
  forget set, others to a held-out set (non-members for the attacks), the rest are retained.
- ``book``: passages of the Crime and Punishment excerpt gensim ships (the only book text
  available offline: about 2,400 characters, Russian opening then English), taught to the
  model first and then unlearned; the retain set is Wikipedia (``wiki:calib``) passages, and
  the held-out passages of the book are the attacks' non-members.

>>> scenario = facts_scenario(lm, seed=1)
>>> len(scenario.forget), len(scenario.retain), len(scenario.holdout)
(40, 300, 40)
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from optlab.core.config import configurable, option, require, require_finite
from optlab.core.data import book_text, country_records, load_text
from optlab.core.models import LoadedModel, cache_dir
from optlab.core.run import atomic_write
from optlab.errors import OptlabError, did_you_mean
from optlab.eval.scorer import Scorer
from optlab.unlearning.data import Example, data_file, load_examples, passages
from optlab.unlearning.harm import HarmClassifier
from optlab.unlearning.metrics import answer_correct, answers

log = logging.getLogger("optlab")

SCENARIOS = ("facts", "book")
# Record field -> question template; answers are the record's value. No demonyms: under the
# "contains" rule, echoing the country name ("Afghanistan") would pass for "Afghan".
FACT_TEMPLATES = {
    "capital": "What is the capital city of {name}?",  # SmolLM2 knows more than with "capital"
    "currency": "What is the ISO currency code of {name}?",
}


@dataclass
class Scenario:
    """Forget, retain and held-out examples; ``teach`` says the forget set must be taught
    (fine-tuned) before it can be unlearned."""

    name: str
    forget: list[Example]
    retain: list[Example]
    holdout: list[Example]
    teach: bool = False
    info: dict = field(default_factory=dict)


def country_questions() -> list[tuple[str, Example]]:
    """(country, question) for every template whose field the record has."""
    out = []
    for record in country_records():
        values = {
            "capital": record.get("capital"),
            "currency": (record.get("currencies") or [None])[0],
        }
        for key, template in FACT_TEMPLATES.items():
            question = template.format(**record)
            # An answer inside its question (Luxembourg, Singapore) is "known" by echoing it.
            if values[key] and str(values[key]).lower() not in question.lower():
                out.append((record["name"], Example(str(values[key]), question)))
    return out


def known_facts(
    lm: LoadedModel,
    max_new_tokens: int = 16,
    progress: bool = True,
    questions: list[tuple[str, Example]] | None = None,
    cache: bool = True,
) -> list[tuple[str, Example]]:
    """The country questions (default: all) the model answers correctly (greedy) as it is.

    Greedy answers to ~500 questions take minutes on a CPU, so the result is cached under
    ``$OPTLAB_CACHE/unlearn``, keyed by a digest of the weights, the questions and the budget.
    """
    questions = questions if questions is not None else country_questions()
    path = _known_cache(lm, questions, max_new_tokens) if cache else None
    if path is not None and path.exists():
        return [(c, Example(a, q)) for c, q, a in json.loads(path.read_text(encoding="utf-8"))]
    scorer = Scorer(lm, batch_size=16, progress=progress)
    predictions = answers(scorer, [e for _, e in questions], max_new_tokens)
    known = [
        q for q, p in zip(questions, predictions, strict=True) if answer_correct(p, q[1].answer)
    ]
    log.info("the model answers %d of %d country questions correctly", len(known), len(questions))
    if path is not None:
        atomic_write(path, json.dumps([(c, e.question, e.answer) for c, e in known]))
    return known


def _known_cache(
    lm: LoadedModel, questions: list[tuple[str, Example]], max_new_tokens: int
) -> Path:
    digest = hashlib.sha256()
    for name, tensor in sorted(lm.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        )
    digest.update(lm.tokenizer.__class__.__name__.encode())
    digest.update(json.dumps([(c, e.to_json()) for c, e in questions]).encode())
    digest.update(str(max_new_tokens).encode())
    return cache_dir() / "unlearn" / f"known-facts-{digest.hexdigest()[:16]}.json"


def facts_scenario(
    lm: LoadedModel,
    seed: int = 0,
    forget_fraction: float = 0.2,
    holdout_fraction: float = 0.2,
    known: list[tuple[str, Example]] | None = None,
    progress: bool = True,
) -> Scenario:
    """Split the known facts by country: ``forget_fraction`` of the countries are forgotten,
    ``holdout_fraction`` held out, the rest retained (``seed`` picks the countries)."""
    known = known if known is not None else known_facts(lm, progress=progress)
    countries = sorted({c for c, _ in known})
    if len(countries) < 10:
        raise OptlabError(
            f"the model answers questions about only {len(countries)} countries correctly; "
            "the facts scenario needs at least 10"
        )
    random.Random(seed).shuffle(countries)
    n_forget = max(1, round(forget_fraction * len(countries)))
    n_holdout = max(1, round(holdout_fraction * len(countries)))
    forget_set = set(countries[:n_forget])
    holdout_set = set(countries[n_forget : n_forget + n_holdout])
    split: dict[str, list[Example]] = {"forget": [], "holdout": [], "retain": []}
    for country, example in known:
        part = (
            "forget" if country in forget_set else "holdout" if country in holdout_set else "retain"
        )
        split[part].append(example)
    random.Random(seed).shuffle(split["retain"])  # RA's first 100 cover many countries
    info = {"known_facts": len(known), "countries": len(countries),
            "forget_countries": sorted(forget_set)}  # fmt: skip
    return Scenario("facts", split["forget"], split["retain"], split["holdout"], info=info)


def book_scenario(
    lm: LoadedModel, seed: int = 0, passage_tokens: int = 64, retain_passages: int = 64
) -> Scenario:
    """Book passages (two thirds forgotten, one third held out) and Wikipedia retain text."""
    book = passages(lm.tokenizer, book_text(), passage_tokens)
    if len(book) < 3:
        raise OptlabError(f"the book gives only {len(book)} passages of {passage_tokens} tokens")
    random.Random(seed).shuffle(book)
    n_holdout = max(1, len(book) // 3)
    retain = passages(lm.tokenizer, load_text("wiki:calib")[:200_000], passage_tokens)
    random.Random(seed).shuffle(retain)
    info = {"book_passages": len(book), "passage_tokens": passage_tokens}
    return Scenario("book", book[n_holdout:], retain[:retain_passages], book[:n_holdout],
                    teach=True, info=info)  # fmt: skip


@configurable("unlearn-data")
@dataclass(frozen=True)
class UnlearnData:
    """The data of an unlearning run, as a spec: a shipped ``scenario`` (built for each seed:
    the seed picks the split), or the user's ``forget`` file with optional ``retain`` and
    ``holdout`` files (``.jsonl`` of question/answer or text lines, ``.txt`` documents split
    by blank lines); ``harm_labels`` trains the harmful-response classifier. Exactly one of
    ``scenario`` and ``forget``; the files must exist.

    >>> UnlearnData(scenario="facts").scenario
    'facts'
    """

    scenario: str | None = option(None, "facts or book", metavar="NAME")
    forget: str | None = option(None, "forget set: .jsonl or .txt", metavar="FILE")
    retain: str | None = option(None, "retain set: .jsonl or .txt", metavar="FILE")
    holdout: str | None = option(None, "held-out non-members for the attacks (.jsonl/.txt)",
                                 metavar="FILE")  # fmt: skip
    harm_labels: str | None = option(None, '.jsonl of {"text","label"} to train the harm '
                                     "classifier", metavar="FILE")  # fmt: skip
    forget_share: float = option(0.2, "facts: share of the countries whose facts are forgotten")
    holdout_share: float = option(0.2, "facts: share of the countries held out (non-members)")

    def __post_init__(self) -> None:
        if self.scenario is not None:
            require(not (self.forget or self.retain or self.holdout),
                    "give either --scenario or --forget/--retain/--holdout, not both")  # fmt: skip
            if self.scenario not in SCENARIOS:
                raise did_you_mean("scenario", self.scenario, SCENARIOS)
        elif not self.forget:
            raise OptlabError("give --scenario facts|book, or --forget FILE (and --retain FILE)")
        for name in ("forget", "retain", "holdout"):
            if getattr(self, name):
                data_file(getattr(self, name))
        if self.harm_labels:
            data_file(self.harm_labels, (".jsonl",))
        require_finite(self, "forget_share", "holdout_share")
        require(self.forget_share > 0 and self.holdout_share > 0 and
                self.forget_share + self.holdout_share < 1,
                "forget_share and holdout_share must be positive with a sum below 1 (the rest "
                f"is retained), got {self.forget_share} and {self.holdout_share}")  # fmt: skip

    def build(self, lm: LoadedModel, seed: int = 0, **options: object) -> Scenario:
        """The examples: the scenario's split for ``seed`` (``options`` go to it, e.g. the
        ``known`` facts), or the files (the same whatever the seed)."""
        if self.scenario == "facts":
            options = {"forget_fraction": self.forget_share,
                       "holdout_fraction": self.holdout_share, **options}  # fmt: skip
        if self.scenario is not None:
            return get_scenario(self.scenario, lm, seed, **options)
        sets = [load_examples(path) if path else [] for path in (self.retain, self.holdout)]
        return Scenario("files", load_examples(str(self.forget)), *sets)

    def harm_classifier(self) -> HarmClassifier | None:
        return HarmClassifier.from_jsonl(self.harm_labels) if self.harm_labels else None


def get_scenario(name: str, lm: LoadedModel, seed: int = 0, **options: object) -> Scenario:
    if name == "facts":
        return facts_scenario(lm, seed, **options)  # type: ignore[arg-type]
    if name == "book":
        return book_scenario(lm, seed, **options)  # type: ignore[arg-type]
    raise did_you_mean("scenario", name, SCENARIOS)
