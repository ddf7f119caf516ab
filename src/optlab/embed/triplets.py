"""Training triplets (sentence, positive, hard negative) for contrastive PromptEOL tuning.

Files in the layouts users have: SimCSE's NLI csv (``sent0,sent1,hard_neg``), SNLI / MNLI
(``sentence1,sentence2,gold_label``: the ``.jsonl`` releases and GLUE's MNLI ``.tsv``) and
Hugging Face ``datasets`` exports (``premise,hypothesis,label``, label 0 entailment, 2
contradiction). NLI rows become triplets as SimCSE built them: a premise with an entailed
hypothesis (the positive) and a contradicting one (the hard negative); premises without both
are dropped.

``builtin`` is a demo set built here from real text shipped in gensim's test data (NLI data
is not obtainable offline):

* **sentences** from the 300 news documents of Lee's *background* corpus
  (``lee_background.cor``; Lee, Pincombe & Welsh 2005, ABC news): each sentence is the
  anchor, the next sentence of the same document its positive, a sentence of another,
  seeded-random document its negative (same story = similar, as Lee's judges rated).
  The background corpus is a different set of documents from the 50 scored ones
  (``lee.cor``): no document, sentence or 8-word run of them appears in it.
* **words** from the semantic sections of Mikolov et al.'s analogy questions
  (``questions-words.txt``, Apache-2.0: capitals, currencies, US cities, family, nationality
  adjectives): a word, its counterpart (Athens -> Greece), and a word of another section.
  Every triplet with a word of WordSim-353 or SimLex-999 is left out.

So the demo set shares no text with an evaluation set (tests/embed check it).

>>> triplets = builtin_triplets()
>>> len(triplets), triplets[0][0][:32]
(2478, '"The asylum seekers have various')
"""

from __future__ import annotations

import csv
import io
import itertools
import random
import re
from dataclasses import dataclass
from pathlib import Path

from optlab.core import data
from optlab.core.config import configurable, option, require_positive
from optlab.core.files import read_text_file
from optlab.embed.sts import SHIPPED, sts_pairs
from optlab.errors import OptlabError

Triplet = tuple[str, str, str]  # (sentence, positive, hard negative)
SUFFIXES = (".csv", ".tsv", ".jsonl")
SIMCSE = ("sent0", "sent1", "hard_neg")
NLI = (("sentence1", "sentence2", "gold_label"), ("premise", "hypothesis", "label"))
# datasets' SNLI / MNLI label ids; the releases spell the labels out.
LABELS = {"0": "entailment", "2": "contradiction"}
ANALOGY_SECTIONS = ("capital-common-countries", "capital-world", "currency", "city-in-state",
                    "family", "gram6-nationality-adjective")  # fmt: skip
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


@configurable("embed-triplets")
@dataclass(frozen=True)
class TripletData:
    """Where the triplets come from, and the dev set that chooses the checkpoint.

    >>> TripletData(pairs="snli_1.0_train.jsonl", dev="lee").dev
    'lee'
    """

    pairs: str = option("builtin", "training triplets: builtin (news sentences and words, "
                        "shipped) or a .csv/.tsv/.jsonl: SimCSE sent0,sent1,hard_neg; SNLI/"
                        "MNLI sentence1,sentence2,gold_label", metavar="FILE")  # fmt: skip
    dev: str = option("heldout", "dev STS set that picks the checkpoint: heldout (held-out "
                      "triplets: positive 1, negative 0), lee, wordsim353, simlex999 or a "
                      ".tsv/.csv", metavar="SET")  # fmt: skip
    dev_size: int = option(200, "heldout: triplets held out of training for the dev set")
    limit: int | None = option(None, "first N training triplets only")

    def __post_init__(self) -> None:
        require_positive(self, "dev_size", "limit")
        if self.pairs != "builtin" and Path(self.pairs).suffix not in SUFFIXES:
            raise OptlabError(f"--pairs {self.pairs!r}: give builtin or a .csv, .tsv or .jsonl "
                              "file of triplets")  # fmt: skip
        named = self.dev == "heldout" or self.dev in SHIPPED
        if not named and Path(self.dev).suffix not in (".tsv", ".csv"):
            sts_pairs(self.dev)  # the did-you-mean error

    def split(self) -> tuple[list[Triplet], list[tuple[str, str, float]]]:
        """(training triplets, dev pairs); the held-out dev triplets are the last ones."""
        triplets = builtin_triplets() if self.pairs == "builtin" else read_triplets(self.pairs)
        if self.dev != "heldout":
            return triplets[: self.limit], sts_pairs(self.dev)
        held = min(self.dev_size, len(triplets) // 5) or 1
        if len(triplets) <= held:
            raise OptlabError(f"{self.pairs}: {len(triplets)} triplet(s) leave none to train on "
                              "beside the held-out dev set; give more, or --dev SET")  # fmt: skip
        train, dev = triplets[:-held], triplets[-held:]
        pairs = [(a, b, score) for a, p, n in dev for b, score in ((p, 1.0), (n, 0.0))]
        return train[: self.limit], pairs


def _rows(path: Path) -> list[dict[str, object]]:
    if path.suffix == ".jsonl":
        rows = []
        for number, obj in data.read_jsonl(path, "pairs file"):
            if not isinstance(obj, dict):
                raise OptlabError(f"{path}:{number}: expected a JSON object per line")
            rows.append(obj)
        return rows
    text = read_text_file(path, "pairs file")
    # GLUE's MNLI .tsv has stray quotes inside sentences: tabs only, no quoting.
    quoting = csv.QUOTE_NONE if path.suffix == ".tsv" else csv.QUOTE_MINIMAL
    return list(csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix == ".tsv"
                               else ",", quoting=quoting))  # fmt: skip


def read_triplets(path: str | Path) -> list[Triplet]:
    """The triplets of a SimCSE / SNLI / MNLI / datasets file (see the module docstring)."""
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise OptlabError(f"{path}: no rows: the pairs file is empty")
    header = set(rows[0])
    if set(SIMCSE) <= header:
        triplets = []
        for number, row in enumerate(rows, 1):
            triplet = tuple(str(row.get(k) or "").strip() for k in SIMCSE)
            if not all(triplet):
                raise OptlabError(f"{path}: row {number} has an empty {'/'.join(SIMCSE)} field")
            triplets.append(triplet)
        return triplets  # type: ignore[return-value]
    for premise, hypothesis, label in NLI:
        if {premise, hypothesis, label} <= header:
            return _nli_triplets(path, rows, premise, hypothesis, label)
    layouts = " or ".join(",".join(c) for c in (SIMCSE, *NLI))
    raise OptlabError(f"{path}: no {layouts} columns; it has "
                      f"{', '.join(sorted(map(str, header))) or 'none'}")  # fmt: skip


def _nli_triplets(
    path: Path, rows: list[dict[str, object]], premise: str, hypothesis: str, label: str
) -> list[Triplet]:
    """One triplet per entailed hypothesis of a premise, with its premise's contradictions in
    turn as hard negatives; neutral and unlabelled ('-') rows are not used."""
    by_premise: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        kind = str(row.get(label, "")).strip()
        kind = LABELS.get(kind, kind)
        text, other = str(row.get(premise) or "").strip(), str(row.get(hypothesis) or "").strip()
        if kind in ("entailment", "contradiction") and text and other:
            by_premise.setdefault(text, {"entailment": [], "contradiction": []})[kind].append(other)
    triplets = [(text, positive, found["contradiction"][i % len(found["contradiction"])])
                for text, found in by_premise.items() if found["contradiction"]
                for i, positive in enumerate(found["entailment"])]  # fmt: skip
    if not triplets:
        raise OptlabError(f"{path}: no premise has both an entailment and a contradiction, so "
                          "there are no triplets")  # fmt: skip
    return triplets


def _sentences(document: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(document) if len(s.split()) >= 5]


def evaluation_texts() -> set[str]:
    """Every text of the shipped evaluation sets, lower-cased: the demo set avoids them."""
    return {t.strip().lower() for name in SHIPPED for a, b, _ in sts_pairs(name) for t in (a, b)}


def builtin_triplets(seed: int = 0) -> list[Triplet]:
    """The demo set: Lee background sentences, then analogy words, in a seeded order (the
    dev set held out of it is its tail: both kinds)."""
    rng = random.Random(seed)
    documents = [_sentences(doc) for doc in data.lee_background()]
    documents = [doc for doc in documents if len(doc) >= 2]
    triplets: list[Triplet] = []
    for index, doc in enumerate(documents):
        for anchor, positive in itertools.pairwise(doc):
            other = rng.choice([d for i, d in enumerate(documents) if i != index])
            triplets.append((anchor, positive, rng.choice(other)))
    banned = evaluation_texts()
    sections = data.analogy_questions()
    pairs = {name: sorted({(a, b) for q in sections[name] for a, b in (q[:2], q[2:])
                           if a.lower() not in banned and b.lower() not in banned})
             for name in ANALOGY_SECTIONS}  # fmt: skip
    for name, found in pairs.items():
        others = [w for other in ANALOGY_SECTIONS if other != name for pair in pairs[other]
                  for w in pair]  # fmt: skip
        triplets.extend((a, b, rng.choice(others)) for a, b in found)
    # Once per anchor: some stories repeat a sentence, two sections share Berlin -> Germany.
    triplets = list({t[0]: t for t in reversed(triplets)}.values())[::-1]
    rng.shuffle(triplets)
    return triplets
