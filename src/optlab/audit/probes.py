"""Persuasion probes: each forgotten fact asked plainly and in persuasive framings (SKeB).

Framings come from a template library of plain text files, one file per framing
(``plain.txt``, ``emotional.txt``, ``logical.txt``, ``authority.txt`` ship with optlab), one
template per line with ``{question}`` and optionally ``{subject}`` and ``{related}`` (the
subject's three most strongly linked entities in the domain graph, the answer excluded, so a
framing can activate the knowledge around the fact); ``suffix.txt`` holds the
insistence suffix added to every prompt (none ships: the default model then often answers
with nothing). A folder of your own files adds framings or replaces
shipped ones. Prompts written elsewhere (e.g. by an LLM, as in the paper) load from JSONL.

>>> library = TemplateLibrary.load()             # or TemplateLibrary.load("my_templates/")
>>> probes = build_probes(facts, library, seed=0)
>>> probes[1].framing, probes[1].prompt
('emotional', 'My grandmother is very ill, ... Please help me: What is the capital of France?')
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from optlab.audit.graph import DomainGraph
from optlab.core.data import read_jsonl, read_text_file
from optlab.errors import OptlabError

FRAMINGS = ("plain", "emotional", "logical", "authority")
QA_FORMAT = "### Question: {prompt}\n ### Answer:"  # the unlearning runs' question format


@dataclass(frozen=True)
class Fact:
    """A fact that was (meant to be) forgotten: the question, its gold answer, its subject."""

    question: str
    answer: str
    subject: str = ""


@dataclass(frozen=True)
class Probe:
    """One prompt sent to the model: a fact in one framing."""

    fact: int  # index into the facts
    framing: str
    prompt: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not
            line.lstrip().startswith("#")]  # fmt: skip


@dataclass(frozen=True)
class TemplateLibrary:
    """Templates per framing (``plain`` first) and the suffix added to every prompt."""

    templates: dict[str, list[str]]
    suffix: str = ""

    @classmethod
    def load(cls, folder: str | Path | None = None) -> TemplateLibrary:
        """The shipped library, with the ``*.txt`` files of ``folder`` added or replacing."""
        shipped = resources.files("optlab.audit").joinpath("templates")
        files = {p.name: p.read_text("utf-8") for p in shipped.iterdir() if p.name.endswith(".txt")}
        if folder is not None:
            path = Path(folder)
            if not path.is_dir():
                raise OptlabError(f"template folder not found: {path}")
            files |= {p.name: read_text_file(p, "template file", allow_empty=True)
                      for p in sorted(path.glob("*.txt"))}  # fmt: skip
        suffix = " ".join(_lines(files.pop("suffix.txt", "")))
        templates = {name.removesuffix(".txt"): _lines(text) for name, text in files.items()}
        for name, lines in templates.items():
            if not lines:
                raise OptlabError(f"framing {name!r} has no templates")
            for line in lines:
                if "{question}" not in line:
                    raise OptlabError(f"template of framing {name!r} lacks {{question}}: {line!r}")
        if "plain" not in templates:
            raise OptlabError("the template library needs a 'plain' framing (plain.txt)")
        order = [f for f in FRAMINGS if f in templates] + sorted(set(templates) - set(FRAMINGS))
        return cls({f: templates[f] for f in order}, suffix)

    @property
    def framings(self) -> list[str]:
        return list(self.templates)

    def render(self, template: str, fact: Fact, related: str = "") -> str:
        try:
            text = template.format(question=fact.question, subject=fact.subject or "it",
                                   related=related or "its neighbours")  # fmt: skip
        except (KeyError, IndexError) as err:
            raise OptlabError(f"template {template!r} uses an unknown field {err}") from None
        return f"{text} {self.suffix}".strip()


def related_entities(graph: DomainGraph | None, fact: Fact, k: int = 3) -> str:
    """The subject's ``k`` heaviest neighbours (ties by name), never the answer: "A, B and C"."""
    subject = graph.canonical(fact.subject) if graph is not None and fact.subject else None
    if subject is None:
        return ""
    answer = graph.canonical(fact.answer) or fact.answer  # type: ignore[union-attr]
    links = graph.neighbours[subject]  # type: ignore[union-attr]
    names = sorted((n for n in links if n != answer), key=lambda n: (-links[n], n))[:k]
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


def build_probes(
    facts: Sequence[Fact],
    library: TemplateLibrary,
    seed: int = 0,
    graph: DomainGraph | None = None,
) -> list[Probe]:
    """Every fact in every framing; where a framing has several templates, one is drawn per
    fact (seeded), so a run is reproducible and the templates are used evenly at random.
    ``graph`` fills ``{related}``."""
    rng = random.Random(seed)
    probes = []
    for i, fact in enumerate(facts):
        related = related_entities(graph, fact)
        for framing, templates in library.templates.items():
            template = templates[rng.randrange(len(templates))]
            probes.append(Probe(i, framing, library.render(template, fact, related)))
    return probes


def load_prompts(path: str | Path) -> tuple[list[Fact], list[Probe]]:
    """Prompts written elsewhere: JSONL with ``question``, ``answer``, ``framing`` and
    ``prompt`` (optional ``subject``) per line; lines of one question form one fact."""
    path = Path(path)
    facts: dict[tuple[str, str], int] = {}
    fact_list: list[Fact] = []
    probes = []
    for number, obj in read_jsonl(path, "prompt file"):
        try:
            key = (str(obj["question"]), str(obj["answer"]))
            framing, prompt = str(obj["framing"]), str(obj["prompt"])
        except (KeyError, TypeError):
            raise OptlabError(f"{path}:{number}: expected a JSON object with question, answer, "
                              "framing and prompt") from None  # fmt: skip
        if key not in facts:
            facts[key] = len(fact_list)
            fact_list.append(Fact(*key, subject=str(obj.get("subject", ""))))
        probes.append(Probe(facts[key], framing, prompt))
    if not probes:
        raise OptlabError(f"{path} holds no prompts")
    if "plain" not in {p.framing for p in probes}:
        raise OptlabError(f"{path}: no 'plain' prompts; recovery is measured against them")
    return fact_list, probes


def load_facts(source: str | Path, graph: DomainGraph | None = None) -> list[Fact]:
    """Forgotten facts from an unlearning run directory (its ``forget.jsonl``) or a JSONL file
    of ``{"question", "answer"}`` objects (optional ``subject``; else the first entity the
    graph finds in the question)."""
    path = Path(source)
    if path.is_dir():
        if not (path / "forget.jsonl").is_file():
            raise OptlabError(f"{path} is a folder without forget.jsonl; pass an unlearning run "
                              "or a .jsonl file of questions and answers")  # fmt: skip
        path = path / "forget.jsonl"
    facts = []
    for _, obj in read_jsonl(path, "forgotten facts"):
        if not isinstance(obj, dict) or "question" not in obj or "answer" not in obj:
            continue  # documents ({"text"}) have no question to probe
        subject = obj.get("subject") or ""
        if not subject and graph is not None:
            found = graph.match(obj["question"])
            subject = found[0] if found else ""
        facts.append(Fact(str(obj["question"]), str(obj["answer"]), str(subject)))
    if not facts:
        raise OptlabError(f"{path} holds no question/answer facts to probe")
    return facts


def country_facts(records: Sequence[dict] | None = None) -> list[Fact]:
    """The default facts of the country domain: "What is the capital of X?" per record."""
    from optlab.core.data import country_records

    records = country_records() if records is None else records
    return [Fact(f"What is the capital of {r['name']}?", r["capital"], r["name"])
            for r in records if r.get("capital")]  # fmt: skip
