"""Domain graphs: which entities of a domain occur together, and how often.

Nodes are entities; a node's frequency is the number of source units (records, documents,
chapters) that mention it; an edge's weight is the number of units that mention both ends.
Aliases merge into one canonical entity, and a unit that names an entity twice (or by two
aliases) counts once, so merging never creates a self-loop.

>>> graph = country_graph()                  # the shipped country records
>>> graph.frequency["Paris"], graph.weight("France", "Paris")
(1, 1)
>>> graph.match("Is Paris the capital of France?")
['Paris', 'France']
>>> corpus = DomainGraph.from_corpus(chapters, ["Harry", "Hermione"], {"Harry": ["Potter"]})
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from optlab.core.config import configurable, option
from optlab.core.data import read_text_file
from optlab.errors import OptlabError

GRAPH_FORMAT = "optlab-domain-graph/1"


def _key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


class DomainGraph:
    """An undirected weighted co-occurrence graph of entities with an alias map."""

    def __init__(
        self,
        frequency: Mapping[str, int],
        edges: Mapping[tuple[str, str], int],
        aliases: Mapping[str, str] | None = None,
        kinds: Mapping[str, str] | None = None,
        units: int = 0,
    ) -> None:
        self.frequency = dict(frequency)
        self.edges = {_key(a, b): int(w) for (a, b), w in edges.items() if a != b and w > 0}
        for a, b in self.edges:
            if a not in self.frequency or b not in self.frequency:
                raise OptlabError(f"edge ({a!r}, {b!r}) names an entity that is not a node")
        self.aliases = {alias: name for alias, name in (aliases or {}).items()
                        if name in self.frequency}  # fmt: skip
        self.kinds = dict(kinds or {})
        self.units = units
        self.neighbours: dict[str, dict[str, int]] = {n: {} for n in self.frequency}
        for (a, b), w in self.edges.items():
            self.neighbours[a][b] = w
            self.neighbours[b][a] = w

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_units(
        cls,
        units: Iterable[Iterable[str]],
        aliases: Mapping[str, Iterable[str]] | None = None,
        kinds: Mapping[str, str] | None = None,
    ) -> DomainGraph:
        """Count entities per unit. ``units`` hold canonical names or aliases; ``aliases`` maps
        a canonical name to its other names. Each unit counts an entity once."""
        to_name = _alias_table(aliases or {})
        frequency: Counter[str] = Counter()
        edges: Counter[tuple[str, str]] = Counter()
        count = 0
        for unit in units:
            count += 1
            present = sorted({to_name.get(e, e) for e in unit})
            frequency.update(present)
            edges.update(itertools.combinations(present, 2))  # sorted: a < b
        for name in kinds or {}:
            frequency.setdefault(name, 0)  # declared entities stay nodes even if unseen
        return cls(frequency, edges, to_name, kinds, units=count)

    @classmethod
    def from_corpus(
        cls,
        texts: Iterable[str],
        entities: Iterable[str],
        aliases: Mapping[str, Iterable[str]] | None = None,
        kind: str = "entity",
    ) -> DomainGraph:
        """One unit per text (a document, a chapter); entities found with :meth:`match`'s rule
        (whole words, case-insensitive, longest first, contained matches dropped)."""
        names = list(dict.fromkeys(entities))
        if not names:
            raise OptlabError("the entity list is empty")
        unknown = [n for n in (aliases or {}) if n not in names]
        if unknown:
            raise OptlabError(f"alias map names entities not in the entity list: {unknown[:5]}")
        matcher = EntityMatcher(names, _alias_table(aliases or {}))
        return cls.from_units((matcher.match(t) for t in texts), aliases,
                              dict.fromkeys(names, kind))  # fmt: skip

    # ------------------------------------------------------------------ queries
    def weight(self, a: str, b: str) -> int:
        return self.neighbours.get(a, {}).get(b, 0)

    def degree(self, name: str) -> int:
        return len(self.neighbours.get(name, {}))

    def canonical(self, name: str) -> str | None:
        """The node a name or alias stands for (case-insensitive), or None."""
        if name in self.frequency:
            return name
        return self.matcher.lookup(name)

    @functools.cached_property
    def matcher(self) -> EntityMatcher:
        return EntityMatcher(list(self.frequency), self.aliases)

    def match(self, text: str) -> list[str]:
        """The entities a text mentions, canonical, in order of first mention."""
        return self.matcher.match(text)

    def summary(self, top: int = 5) -> dict[str, Any]:
        """Counts, density, degree and weight statistics, the most connected entities."""
        n, m = len(self.frequency), len(self.edges)
        degrees = sorted(((self.degree(x), x) for x in self.frequency), key=lambda t: (-t[0], t[1]))
        return {
            "nodes": n,
            "edges": m,
            "units": self.units,
            "density": 2 * m / (n * (n - 1)) if n > 1 else 0.0,
            "mean_degree": 2 * m / n if n else 0.0,
            "total_weight": sum(self.edges.values()),
            "max_weight": max(self.edges.values(), default=0),
            "isolated": sum(1 for d, _ in degrees if d == 0),
            "components": len(self.components()),
            "kinds": dict(Counter(self.kinds.get(x, "entity") for x in self.frequency)),
            "top_degree": {x: d for d, x in degrees[:top]},
        }

    def components(self) -> list[set[str]]:
        seen: set[str] = set()
        parts = []
        for start in self.frequency:
            if start in seen:
                continue
            part, stack = {start}, [start]
            while stack:
                for nxt in self.neighbours[stack.pop()]:
                    if nxt not in part:
                        part.add(nxt)
                        stack.append(nxt)
            seen |= part
            parts.append(part)
        return parts

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": GRAPH_FORMAT,
            "units": self.units,
            "nodes": {
                x: {"frequency": f, "kind": self.kinds.get(x, "entity")}
                for x, f in self.frequency.items()
            },
            "edges": [[a, b, w] for (a, b), w in sorted(self.edges.items())],
            "aliases": dict(sorted(self.aliases.items())),
        }

    def save(self, path: str | Path) -> Path:
        from optlab.core.run import atomic_write

        path = Path(path)
        atomic_write(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DomainGraph:
        if data.get("format") != GRAPH_FORMAT:
            raise OptlabError(f"not a domain graph (format {data.get('format')!r}, expected "
                              f"{GRAPH_FORMAT!r})")  # fmt: skip
        nodes = data["nodes"]
        return cls(
            {x: int(v["frequency"]) for x, v in nodes.items()},
            {(a, b): int(w) for a, b, w in data["edges"]},
            data.get("aliases", {}),
            {x: v.get("kind", "entity") for x, v in nodes.items()},
            units=int(data.get("units", 0)),
        )

    @classmethod
    def load(cls, path: str | Path) -> DomainGraph:
        path = Path(path)
        try:
            data = json.loads(read_text_file(path, "graph file"))
        except json.JSONDecodeError as err:
            raise OptlabError(f"{path}: not valid JSON ({err.msg})") from None
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise OptlabError(f"{path}: malformed domain graph ({err})") from None


def _alias_table(aliases: Mapping[str, Iterable[str]] | Mapping[str, str]) -> dict[str, str]:
    """alias -> canonical name, from canonical -> [aliases] (or an alias -> name table)."""
    table: dict[str, str] = {}
    for name, others in aliases.items():
        if isinstance(others, str):  # already alias -> name
            table[name] = others
            continue
        for alias in others:
            if alias != name:
                table[alias] = name
    return table


class EntityMatcher:
    """Find entity mentions: whole-word, case-insensitive matches of names and aliases,
    leftmost-longest; then a match whose text occurs, as whole words, inside another match's
    text is dropped (so "Guinea" does not count when "Papua New Guinea" is also named, while
    "Fiji" still counts beside "Fijian dollar")."""

    def __init__(self, names: Sequence[str], aliases: Mapping[str, str]) -> None:
        self.surface: dict[str, str] = {}
        for form, name in [*((n, n) for n in names), *aliases.items()]:
            self.surface.setdefault(form.casefold(), name)
        forms = sorted(self.surface, key=lambda f: (-len(f), f))
        self.pattern = (
            re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, forms)) + r")(?!\w)", re.IGNORECASE)
            if forms
            else None
        )

    def lookup(self, form: str) -> str | None:
        return self.surface.get(form.casefold())

    def match(self, text: str) -> list[str]:
        if self.pattern is None:
            return []
        found = [m.group(0).casefold() for m in self.pattern.finditer(text)]
        forms = set(found)
        kept = [f for f in found if not any(f != g and _contains_word(g, f) for g in forms)]
        return list(dict.fromkeys(self.surface[f] for f in kept))


def _contains_word(text: str, part: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(part)}(?!\w)", text) is not None


@functools.cache
def common_words() -> frozenset[str]:
    """Words that occur in lower case in the shipped Wikipedia text (so are not only names)."""
    from optlab.core.data import wiki_text

    return frozenset(re.findall(r"\b[a-z][a-z'-]*\b", wiki_text()))


@functools.cache
def country_names() -> dict[str, Any]:
    """The shipped names of currency / language codes and country aliases (plain JSON)."""
    text = resources.files("optlab.audit").joinpath("data/country_names.json").read_text("utf-8")
    return json.loads(text)


def country_units(
    records: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[list[list[str]], dict[str, str], dict[str, list[str]]]:
    """The units of the country domain: one per record (country, capital, currencies,
    languages, region, subregion) and one per pair of bordering countries; with each entity's
    kind and the alias map (short country names, currency names and ISO currency codes)."""
    from optlab.core.data import country_records

    records = country_records() if records is None else records
    names = country_names()
    by_iso = {r.get("iso3"): r["name"] for r in records if r.get("iso3")}
    kinds: dict[str, str] = {}
    units: list[list[str]] = []
    pairs: set[tuple[str, str]] = set()

    def add(name: str | None, kind: str, unit: list[str]) -> None:
        if name:
            kinds.setdefault(name, kind)  # a capital named like its country stays a country
            unit.append(name)

    for record in records:
        unit: list[str] = []
        add(record["name"], "country", unit)
        add(record.get("capital"), "capital", unit)
        for code in record.get("currencies", []):
            add(names["currencies"].get(code, code), "currency", unit)
        for code in record.get("languages", []):
            add(names["languages"].get(code, code), "language", unit)
        add(record.get("region"), "region", unit)
        add(record.get("subregion"), "region", unit)
        units.append(unit)
        for code in record.get("borders", []):
            if code in by_iso and by_iso[code] != record["name"]:
                pairs.add(_key(record["name"], by_iso[code]))
    units += [list(pair) for pair in sorted(pairs)]
    aliases = {n: list(a) for n, a in {**names["country_aliases"],
               **names["currency_aliases"]}.items() if n in kinds}  # fmt: skip
    # ISO codes name currencies too ("EUR"), unless the code is also a word ("ALL", "TOP").
    for code, name in names["currencies"].items():
        if name in kinds and code.lower() not in common_words():
            aliases.setdefault(name, []).append(code)
    return units, kinds, aliases


def country_graph(records: Sequence[Mapping[str, Any]] | None = None) -> DomainGraph:
    """The country domain graph from the shipped records (see :func:`country_units`)."""
    units, kinds, aliases = country_units(records)
    return DomainGraph.from_units(units, aliases, kinds)


DOMAINS = {"countries": country_graph}


def load_domain(domain: str) -> DomainGraph:
    """A built-in domain (``countries``) or a graph JSON file written by :meth:`save`."""
    if domain in DOMAINS:
        return DOMAINS[domain]()
    if domain.endswith(".json") or Path(domain).exists():
        return DomainGraph.load(domain)
    from optlab.errors import did_you_mean

    raise did_you_mean("domain", domain, DOMAINS)


def graph_from_files(
    corpus: str | Path,
    entities: str | Path,
    aliases: str | Path | None = None,
    unit_regex: str | None = None,
) -> DomainGraph:
    """A corpus graph from files: the corpus (``.txt``; units are blank-line separated
    documents, or the pieces between matches of ``unit_regex``, e.g. ``^CHAPTER``), the
    entities (one per line) and optionally an alias map (JSON: name -> [aliases])."""
    paths = {"corpus": Path(corpus), "entity list": Path(entities)}
    if aliases is not None:
        paths["alias map"] = Path(aliases)
    texts = {what: read_text_file(path, what) for what, path in paths.items()}
    text = texts["corpus"]
    try:
        splitter = re.compile(unit_regex or r"\n\s*\n", re.MULTILINE)
    except re.error as err:
        raise OptlabError(f"bad --unit-regex {unit_regex!r}: {err}") from None
    units = [u for u in splitter.split(text) if u.strip()]
    names = [n.strip() for n in texts["entity list"].splitlines() if n.strip()]
    alias_map: dict[str, list[str]] = {}
    if aliases is not None:
        try:
            alias_map = json.loads(texts["alias map"])
        except json.JSONDecodeError as err:
            raise OptlabError(f"{aliases}: not valid JSON ({err.msg})") from None
        if not isinstance(alias_map, dict) or not all(
            isinstance(v, list) for v in alias_map.values()
        ):
            raise OptlabError(f"{aliases}: expected a JSON object of name -> [aliases]")
    return DomainGraph.from_corpus(units, names, alias_map)


@configurable("graph")
@dataclass(frozen=True)
class GraphConfig:
    """Where a domain graph comes from: a built-in domain, or a corpus with its entities.

    >>> GraphConfig(domain="countries")
    GraphConfig(domain='countries', corpus=None, entities=None, aliases=None, unit_regex=None)
    """

    domain: str | None = option(None, "a built-in domain (countries)")
    corpus: str | None = option(None, ".txt corpus; units are blank-line separated documents")
    entities: str | None = option(None, "entity names, one per line")
    aliases: str | None = option(None, 'JSON object: {"name": ["alias", ...]}')
    unit_regex: str | None = option(None, "split units at this regex instead (e.g. ^CHAPTER)")

    def __post_init__(self) -> None:
        if self.domain and self.corpus:
            raise OptlabError("give --domain countries, or --corpus FILE with --entities FILE")
        if self.corpus and not self.entities:
            raise OptlabError("--corpus needs --entities FILE (one entity name per line)")

    def build(self) -> DomainGraph:
        if not (self.domain or self.corpus):
            raise OptlabError("give --domain countries, or --corpus FILE with --entities FILE")
        if self.domain:
            return load_domain(self.domain)
        return graph_from_files(str(self.corpus), str(self.entities), self.aliases,
                                self.unit_regex)  # fmt: skip
