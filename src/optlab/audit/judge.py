"""Label a model's answer to a probe: factual, non-factual or hallucinated, per sentence.

The default judge is deterministic and grounded in the domain graph: a sentence that states
the gold answer (or an alias of it) is **factual**; otherwise one that asserts a named entity
that is neither in the domain graph nor in the prompt is **hallucinated** (a named entity is
a run of capitalised words; a single capitalised word opening a sentence counts only if it
never occurs in lower case in the shipped Wikipedia text, so "Beautiful." is no name and
"Calcutta." is one); anything else
(other entities of the domain, or none) is **non-factual**. A response gets the share of its
sentences in each label, and ``recall`` = it states the gold answer somewhere. An optional
model judge asks a local causal LM the same question, per sentence, through the same
interface.

>>> judge = GraphJudge(country_graph())
>>> judge.judge(fact, prompt, "The capital is Paris. It is lovely.").labels
['factual', 'non-factual']
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from optlab.audit.graph import DomainGraph, common_words
from optlab.audit.probes import Fact

LABELS = ("factual", "non-factual", "hallucinated")
# Capitalised words that start sentences or are pronouns, not names.
_NOT_NAMES = {
    "the", "a", "an", "it", "its", "this", "that", "these", "those", "i", "you", "we", "he",
    "she", "they", "my", "your", "our", "yes", "no", "sure", "well", "please", "however",
    "answer", "question", "in", "on", "of", "as", "and", "but", "or", "if", "so", "there",
    "here", "what", "which", "who", "capital", "currency", "language", "according", "also",
    "today", "sorry", "unfortunately", "thank", "thanks", "hello", "hi", "oh", "ok", "okay",
}  # fmt: skip
_NAME = re.compile(r"\b[A-Z][\w'’-]*(?:\s+(?:of|the|de|la|and)?\s*[A-Z][\w'’-]*)*")


def sentences(text: str) -> list[str]:
    """Split on sentence-ending punctuation and line breaks; drop empty pieces."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", text.strip())
    return [p.strip() for p in parts if re.search(r"\w", p)]


@dataclass(frozen=True)
class Judgement:
    """Labels per sentence and their shares; ``recall``: the gold answer is stated."""

    labels: list[str]
    sentences: list[str]

    @property
    def shares(self) -> dict[str, float]:
        n = len(self.labels)
        return {label: self.labels.count(label) / n if n else 0.0 for label in LABELS}

    @property
    def recall(self) -> bool:
        return "factual" in self.labels


class Judge(Protocol):
    def judge_all(self, items: Sequence[tuple[Fact, str, str]]) -> list[Judgement]:
        """Judge (fact, prompt, response) triples."""
        ...


class GraphJudge:
    """The deterministic graph-grounded judge (see the module docstring)."""

    def __init__(self, graph: DomainGraph) -> None:
        self.graph = graph

    def _gold_forms(self, answer: str) -> re.Pattern[str]:
        forms = {answer}
        node = self.graph.canonical(answer)
        if node is not None:
            forms |= {node, *(a for a, n in self.graph.aliases.items() if n == node)}
        alternation = "|".join(map(re.escape, sorted(forms, key=len, reverse=True)))
        return re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)

    def out_of_domain(self, sentence: str, prompt: str) -> list[str]:
        """Named entities (capitalised phrases) that neither the graph nor the prompt holds."""
        known_text = prompt.casefold()
        found = []
        first = re.search(r"\w", sentence)
        for match in _NAME.finditer(sentence):
            opening = first is not None and match.start() == first.start()
            if opening and " " not in match.group(0) and match.group(0).lower() in common_words():
                continue  # a common word capitalised because it opens the sentence
            words = [w for w in match.group(0).split() if w.casefold() not in _NOT_NAMES]
            name = " ".join(words).strip(" '’-")
            if not name or self.graph.match(name) or name.casefold() in known_text:
                continue
            found.append(name)
        return found

    def label(self, fact: Fact, prompt: str, sentence: str) -> str:
        if fact.subject and fact.answer.casefold() in fact.subject.casefold():
            # "Holy See (Vatican City State)" restated is not the answer "Vatican City State".
            sentence = re.sub(re.escape(fact.subject), " ", sentence, flags=re.IGNORECASE)
        if self._gold_forms(fact.answer).search(sentence):
            return "factual"
        if self.out_of_domain(sentence, prompt):
            return "hallucinated"
        return "non-factual"

    def judge(self, fact: Fact, prompt: str, response: str) -> Judgement:
        parts = sentences(response)
        if not parts:  # an empty answer asserts nothing
            return Judgement(["non-factual"], [""])
        return Judgement([self.label(fact, prompt, s) for s in parts], parts)

    def judge_all(self, items: Sequence[tuple[Fact, str, str]]) -> list[Judgement]:
        return [self.judge(*item) for item in items]


class ModelJudge:
    """A local causal LM as the judge: for each sentence, the label whose word is most likely
    after a short instruction (log-likelihood through the Scorer, so any model works)."""

    PROMPT = (
        "Question: {question}\nCorrect answer: {answer}\nSentence: {sentence}\n"
        "Label the sentence as factual (it states the correct answer), non-factual (it does "
        "not state it) or hallucinated (it states a false fact).\nLabel:"
    )

    def __init__(self, scorer: object) -> None:
        self.scorer = scorer  # an optlab.eval.Scorer

    def judge_all(self, items: Sequence[tuple[Fact, str, str]]) -> list[Judgement]:
        split = [sentences(response) or [""] for _, _, response in items]
        requests = []
        for (fact, _, _), parts in zip(items, split, strict=True):
            for sentence in parts:
                context = self.PROMPT.format(question=fact.question, answer=fact.answer,
                                             sentence=sentence)  # fmt: skip
                requests += [(context, f" {label}") for label in LABELS]
        scores = [s for s, _ in self.scorer.loglikelihood(requests)]  # type: ignore[attr-defined]
        out, k = [], 0
        for parts in split:
            labels = []
            for _ in parts:
                options = scores[k : k + len(LABELS)]
                labels.append(LABELS[options.index(max(options))])
                k += len(LABELS)
            out.append(Judgement(labels, parts))
        return out
