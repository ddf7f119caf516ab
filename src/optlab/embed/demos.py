"""In-context demonstrations for PromptEOL: the candidates, and choosing one by dev Spearman.

The paper (spec section 2) prepends one (sentence -> one word) demonstration and picks it per
model as the candidate whose prompt gives the best Spearman on a dev set. The built-in
candidates (``builtin_candidates``) are real data that installs offline:

- the six demonstrations the paper chose for OPT-125m ... 13b (``PRESETS``), quoted from
  Jiang et al. 2023 (arXiv 2307.16645);
- dictionary-style glosses built from the country records of the ``countryinfo`` package
  (1.0.1, MIT licence; its JSON files list each country's demonym and capital): "relating to
  switzerland or its people." -> Swiss (the paper's own OPT-1.3b demonstration has this
  form, from a dictionary definition and its headword) and "the capital city of Syria." ->
  Damascus. Only one-word answers are kept; 60 of each kind, every k-th country by name (125 in
  all: the Swiss gloss is also a preset).

A user's candidates come from a file: ``.txt`` (``SENTENCE=>WORD`` per line), ``.tsv`` /
``.csv`` (``sentence`` and ``word`` columns) or ``.jsonl`` (``{"sentence": ..., "word": ...}``).

>>> candidates = builtin_candidates()
>>> len(candidates), candidates[0]
(125, ('A man is smoking.', 'Smoking'))
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from optlab.core import data
from optlab.core.config import configurable, option, require, require_positive
from optlab.core.files import read_text_file
from optlab.core.models import LoadedModel
from optlab.embed.prompteol import PRESETS, Embedder, PromptEOLConfig, one_word_demo
from optlab.embed.sts import STSEval, sts_spearman
from optlab.errors import OptlabError

log = logging.getLogger("optlab")
PER_KIND = 60  # built-in glosses of each kind (demonym, capital): ~2 minutes of dev scoring each


def _every_kth(pairs: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    step = max(1, len(pairs) // n)
    return pairs[::step][:n]


def builtin_candidates() -> list[tuple[str, str]]:
    """The paper's presets, then 60 demonym and 60 capital glosses of countryinfo's records."""
    demonyms, capitals = [], []
    for record in data.country_records():
        name, demonym, capital = record["name"], record.get("demonym"), record.get("capital")
        if isinstance(demonym, str) and len(demonym.split()) == 1:
            demonyms.append((f"relating to {name.lower()} or its people.", demonym))
        if isinstance(capital, str) and len(capital.split()) == 1 and capital != name:
            capitals.append((f"the capital city of {name}.", capital))
    glosses = _every_kth(demonyms, PER_KIND) + _every_kth(capitals, PER_KIND)
    chosen = list(PRESETS.values()) + glosses
    return list(dict.fromkeys(chosen))  # the order kept, a repeat dropped


def read_candidates(source: str | Path) -> list[tuple[str, str]]:
    """Candidates from ``builtin`` or a ``.txt`` / ``.tsv`` / ``.csv`` / ``.jsonl`` file."""
    if str(source) == "builtin":
        return builtin_candidates()
    path = Path(source).expanduser()
    rows: list[tuple[str, Any, Any]] = []  # (where, sentence, word)
    if path.suffix == ".jsonl":
        for number, obj in data.read_jsonl(path, "candidates file"):
            if not isinstance(obj, dict):
                raise OptlabError(f"{path}:{number}: expected an object with 'sentence' and "
                                  "'word'")  # fmt: skip
            rows.append((f"{path}:{number}", obj.get("sentence"), obj.get("word")))
    elif path.suffix in (".tsv", ".csv"):
        text = read_text_file(path, "candidates file")
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix == ".tsv"
                                else ",")  # fmt: skip
        if reader.fieldnames and not {"sentence", "word"} <= set(reader.fieldnames):
            raise OptlabError(f"{path}: needs 'sentence' and 'word' columns; it has "
                              f"{', '.join(reader.fieldnames)}")  # fmt: skip
        rows = [(f"{path}:{n}", r["sentence"], r["word"]) for n, r in enumerate(reader, 2)]
    elif path.suffix == ".txt":
        for number, line in enumerate(read_text_file(path, "candidates file").splitlines(), 1):
            if line.strip():
                sentence, arrow, word = line.rpartition("=>")
                if not arrow:
                    raise OptlabError(f"{path}:{number}: expected 'SENTENCE=>WORD'")
                rows.append((f"{path}:{number}", sentence, word))
    else:
        raise OptlabError(f"--candidates {str(source)!r}: give 'builtin' or a .txt "
                          "(SENTENCE=>WORD lines), .tsv, .csv or .jsonl file")  # fmt: skip
    candidates = []
    for where, sentence, word in rows:
        if not isinstance(sentence, str) or not isinstance(word, str):
            raise OptlabError(f"{where}: 'sentence' and 'word' must be strings")
        candidates.append(one_word_demo(sentence, word, where))
    if not candidates:
        raise OptlabError(f"{path}: no candidates in it")
    return list(dict.fromkeys(candidates))


@configurable("select-demo")
@dataclass(frozen=True)
class SelectDemoConfig:
    """Where the candidates come from and the dev sets that judge them (mean Spearman).

    >>> SelectDemoConfig(dev=("lee:dev",)).candidates
    'builtin'
    """

    candidates: str = option("builtin", "candidates: 'builtin' or a .txt (SENTENCE=>WORD), "
                             ".tsv/.csv (sentence, word) or .jsonl file",
                             metavar="FILE")  # fmt: skip
    dev: tuple[str, ...] = option(("lee:dev", "wordsim353:dev"), "comma-separated dev STS "
                                  "sets; the mean Spearman ranks the candidates (keep them "
                                  "apart from the sets you report)", metavar="S1,S2")  # fmt: skip
    limit: int | None = option(None, "the first N candidates only")

    def __post_init__(self) -> None:
        object.__setattr__(self, "dev", STSEval(sts=self.dev).sts)  # names checked there
        if self.limit is not None:
            require_positive(self, "limit")
        require(bool(str(self.candidates).strip()), "--candidates is empty: give 'builtin' or "
                "a file")  # fmt: skip


def demo_scores(
    lm: LoadedModel,
    candidates: Sequence[tuple[str, str] | None],
    dev: Mapping[str, Sequence[tuple[str, str, float]]],
    prompt: PromptEOLConfig | None = None,
    *,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Each candidate's dev Spearman x100 per set and their mean (``None``: no demo), in
    the candidates' order."""
    prompt = prompt or PromptEOLConfig()
    scores = []
    for candidate in tqdm(candidates, desc="demos", disable=None if progress else True):
        demo = None if candidate is None else f"{candidate[0]}=>{candidate[1]}"
        encode = functools.partial(Embedder(lm, replace(prompt, demo=demo)).encode,
                                   show_progress_bar=False)  # fmt: skip
        start = time.perf_counter()
        per_set = {name: sts_spearman(encode, pairs) for name, pairs in dev.items()}
        entry: dict[str, Any] = {} if candidate is None else {"sentence": candidate[0],
                                                              "word": candidate[1]}  # fmt: skip
        seconds = time.perf_counter() - start
        scores.append(entry | {"spearman": float(np.mean(list(per_set.values()))),
                               "sets": per_set, "seconds": seconds})  # fmt: skip
        log.info("demo %d/%d %s: dev Spearman %.2f (%.0f s)", len(scores), len(candidates),
                 "(plain template)" if candidate is None else f"{candidate[0]!r} -> {candidate[1]}",
                 scores[-1]["spearman"], seconds)  # fmt: skip
    return scores
