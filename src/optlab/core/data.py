"""Real text and labelled data shipped in PyPI packages (gensim, countryinfo, the stdlib), local
text files, and seeded calibration windows.

Built-in corpora: ``wiki`` (Wikipedia articles, split into disjoint ``wiki:calib`` and
``wiki:eval``), ``book`` (Crime and Punishment) and ``code`` (Python standard library source).
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import importlib.util
import json
import os
import random
import re
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import safetensors.torch
import torch
from transformers import PreTrainedTokenizerBase

from optlab.core.files import read_text_file
from optlab.core.models import cache_dir
from optlab.core.run import atomic_write
from optlab.errors import OptlabError, did_you_mean

CORPORA = ("wiki", "wiki:calib", "wiki:eval", "book", "code")
WORD_PAIRS = {"wordsim353": "wordsim353.tsv", "simlex999": "simlex999.txt"}
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CALIB_FRACTION = 0.8
CODE_CHARS = 2_000_000
TOKEN_CACHE_MIN_CHARS = 100_000  # shorter texts tokenize faster than a cache look-up pays off
# Trailing sections that are citation lists, not prose.
_SKIP_SECTIONS = {"references", "external links", "see also", "further reading", "notes",
                  "bibliography", "sources", "footnotes", "citations"}  # fmt: skip


class LeeSimilarity(NamedTuple):
    """The 50 Lee news documents and their 50x50 symmetric human similarity matrix in [0, 1]."""

    docs: list[str]
    sims: np.ndarray


class WordPair(NamedTuple):
    """Two words and their mean human similarity score (0-10)."""

    word1: str
    word2: str
    score: float


class Post(NamedTuple):
    """A newsgroup post: its group (``sci.space``), subject line and body (headers and quoted
    lines dropped)."""

    group: str
    subject: str
    body: str


class Sentence(NamedTuple):
    """A sentence with its sentiment label (1 positive, 0 negative)."""

    text: str
    label: int


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OptlabError(f"package {package!r} is not installed; `pip install {package}`.")
    return Path(spec.submodule_search_locations[0])


def _gensim_file(name: str) -> Path:
    return _package_dir("gensim") / "test" / "test_data" / name


def _lines(path: Path, encoding: str = "utf-8") -> list[str]:
    return [line.strip() for line in path.read_text(encoding=encoding).splitlines()]


def _strip_tables(raw: str) -> str:
    """Drop (nested) ``{| ... |}`` tables and galleries from raw wikitext: ``filter_wiki`` leaves
    their cells behind as runs of one-word lines, which are not prose."""
    raw = re.sub(r"(?is)<gallery.*?</gallery>", "", raw)
    kept, depth = [], 0
    for line in raw.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        elif depth and stripped.startswith("|}"):
            depth -= 1
        elif not depth:
            kept.append(line)
    return "\n".join(kept)


def _clean_article(title: str, text: str) -> str:
    """Keep the prose of one filtered article: headings as plain lines, no gallery/image
    leftovers, no citation-list sections, one blank line between paragraphs."""
    text = re.sub(r"'{2,}", "", text)  # bold/italic quote runs
    out, skip_level = [title], 0
    for raw in text.splitlines():
        line = re.sub(r"\s+", " ", raw).strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*=+", line)
        if heading:
            level = len(heading.group(1))
            if skip_level and level > skip_level:
                continue
            skip_level = level if heading.group(2).lower() in _SKIP_SECTIONS else 0
            line = heading.group(2)
        if skip_level:
            continue
        if re.match(r"(?i)(file|image|category):", line):
            continue
        # Image captions survive as "caption|alt=..." or "caption|thumb": keep the caption.
        line = re.sub(r"\|\s*(thumb|upright|alt=).*$", "", line)
        line = re.sub(r"\|\s*\d+(x\d+)?px", "\n", line)  # "caption|220px" + glued prose
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list markers
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # parens emptied by removed templates
        line = re.sub(r" +([,;:])", r"\1", line).strip()
        out.append(line if re.search(r"\w", line) else "")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


@functools.cache
def wiki_text() -> str:
    """Cleaned Wikipedia articles (redirects dropped), joined with blank lines; cached on disk."""
    cached = cache_dir() / "data" / "wiki.txt"
    if cached.exists():
        return cached.read_text(encoding="utf-8")
    dump = _gensim_file(WIKI_DUMP)
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki  # slow import: lazy

    articles = []
    with bz2.open(dump) as f:
        for title, raw, _ in extract_pages(f):
            text = filter_wiki(_strip_tables(raw))
            if text.strip() and not text.lstrip().lower().startswith("#redirect"):
                articles.append(_clean_article(title, text))
    text = "\n\n".join(articles)
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, cached)  # atomic: concurrent readers never see a partial file
    return text


def split_text(text: str, fraction: float = CALIB_FRACTION) -> tuple[str, str]:
    """Split at the first blank line at or after ``fraction`` of the characters."""
    cut = text.find("\n\n", int(len(text) * fraction))
    if cut < 0:
        raise OptlabError(f"no blank line after {fraction:.0%} of the text to split at")
    return text[:cut], text[cut + 2 :]


def book_text() -> str:
    """Crime and Punishment as shipped by gensim, minus any Project Gutenberg header/footer."""
    text = _gensim_file("crime-and-punishment.txt").read_text(encoding="utf-8")
    start = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*\n", text)
    end = re.search(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", text)
    return text[start.end() if start else 0 : end.start() if end else len(text)].strip()


def code_text(max_chars: int = CODE_CHARS) -> str:
    """Public top-level stdlib modules in sorted order, up to about ``max_chars`` characters."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        if total >= max_chars:
            break
        if path.name.startswith("_"):  # private helpers and pure-Python twins of C modules
            continue
        parts.append(path.read_text(encoding="utf-8", errors="replace").strip())
        total += len(parts[-1])
    return "\n\n".join(parts)


def read_jsonl(path: str | Path, what: str = "JSON Lines file") -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line of a JSON Lines file; a line that
    is not JSON is named in the error. Callers check the fields they need."""
    for number, line in enumerate(read_text_file(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise OptlabError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        yield number, obj


def _jsonl_text(path: Path) -> str:
    records = []
    for number, obj in read_jsonl(path):
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            records.append(obj["text"])
        elif isinstance(obj, dict) and "question" in obj and "answer" in obj:
            records.append(f"### Question: {obj['question']}\n ### Answer: {obj['answer']}")
        else:
            raise OptlabError(f"{path}:{number}: expected an object with 'text' or "
                              "'question' and 'answer' fields")  # fmt: skip
    return "\n\n".join(records)


def load_text(name: str) -> str:
    """A built-in corpus from ``CORPORA``, or a local ``.txt`` / ``.jsonl`` file."""
    if name in ("wiki", "wiki:calib", "wiki:eval"):
        text = wiki_text()
        return text if name == "wiki" else split_text(text)[name == "wiki:eval"]
    if name == "book":
        return book_text()
    if name == "code":
        return code_text()
    path = Path(name).expanduser()
    if path.suffix in (".txt", ".jsonl") or path.exists():
        if path.suffix == ".jsonl":
            return _jsonl_text(path)
        if path.suffix == ".txt":
            return read_text_file(path, "text file")
        if path.is_dir():
            raise OptlabError(f"text file {str(path)!r} is a folder, not a file")
        raise OptlabError(f"unsupported text file {path}: use .txt or .jsonl")
    hint = "Or pass a local .txt or .jsonl file."
    raise OptlabError(f"{did_you_mean('corpus', name, CORPORA)} {hint}")


def lee_similarity() -> LeeSimilarity:
    """Lee's 50 documents with human similarities; the file stores only the upper triangle."""
    docs = _lines(_gensim_file("lee.cor"), "cp1252")
    upper = np.loadtxt(_gensim_file("similarities0-1.txt"))
    return LeeSimilarity(docs, np.triu(upper) + np.triu(upper, 1).T)


def lee_background() -> list[str]:
    """The 300-document Lee background corpus (one news document per line)."""
    return [doc for doc in _lines(_gensim_file("lee_background.cor")) if doc]


def word_pairs(name: str) -> list[WordPair]:
    """Word-similarity benchmark pairs: ``wordsim353`` or ``simlex999``."""
    if name not in WORD_PAIRS:
        raise did_you_mean("word-pair set", name, WORD_PAIRS)
    pairs = []
    for line in _lines(_gensim_file(WORD_PAIRS[name])):
        if line and not line.startswith("#"):
            w1, w2, score = line.split("\t")
            pairs.append(WordPair(w1, w2, float(score)))
    return pairs


def analogy_questions() -> dict[str, list[tuple[str, str, str, str]]]:
    """Mikolov's analogy questions (a : b :: c : d) by section, e.g. ``capital-world``."""
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    for line in _lines(_gensim_file("questions-words.txt")):
        if line.startswith(":"):
            current = sections.setdefault(line[1:].strip(), [])
        elif line:
            a, b, c, d = line.split()
            current.append((a, b, c, d))
    return sections


def sentiment_sentences() -> list[Sentence]:
    """Pang & Lee movie-review sentences, fastText-style ``__label__pos`` / ``__label__neg``."""
    sentences = []
    for line in _lines(_gensim_file("pang_lee_polarity.cor"), "cp1252"):
        if line:
            label, text = line.split(" ", 1)
            sentences.append(Sentence(text, int(label == "__label__pos")))
    return sentences


def newsgroup_posts() -> list[Post]:
    """The posts of gensim's ``mini_newsgroup`` (sci.space and alt.atheism). The file is a
    zlib-compressed pickle of a scikit-learn Bunch; it is never unpickled: its opcode stream
    is only *read* (``pickletools.genops`` runs nothing) for the string constants that are
    posts, each of which names its group in its own ``Newsgroups:`` header."""
    import pickletools
    import zlib

    raw = zlib.decompress(_gensim_file("mini_newsgroup").read_bytes())
    posts = []
    for _, arg, _ in pickletools.genops(raw):
        if not (isinstance(arg, str) and arg.startswith("Newsgroups:")):
            continue
        head, _, body = arg.partition("\n\n")
        fields = dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)
        kept = [line for line in body.splitlines() if line.strip() and not line.startswith(
            (">", "In article", "|")) and not line.rstrip().endswith("writes:")]  # fmt: skip
        posts.append(Post(fields["Newsgroups"].strip(), fields.get("Subject", "").strip(),
                          re.sub(r"\s+", " ", " ".join(kept)).strip()))  # fmt: skip
    return posts


def country_records() -> list[dict[str, Any]]:
    """One record per country from countryinfo (borders are ISO alpha-3 codes), by name."""
    keys = ("capital", "currencies", "languages", "region", "subregion", "borders",
            "population", "area", "demonym")  # fmt: skip
    records: dict[str, dict[str, Any]] = {}
    for path in sorted((_package_dir("countryinfo") / "data").glob("*.json")):
        raw = json.loads(path.read_text(encoding="utf-8"))
        record = {"name": raw["name"], "iso3": raw.get("ISO", {}).get("alpha3")}
        record |= {key: raw[key] for key in keys if raw.get(key) not in (None, "", [])}
        if isinstance(record.get("capital"), list):  # e.g. the Holy See
            record["capital"] = " / ".join(record["capital"])
        records.setdefault(record["name"], record)  # Curaçao ships twice
    return [records[name] for name in sorted(records)]


def _token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """The text's token ids; long texts are cached on disk, keyed on text and tokenizer."""
    cached = None
    if len(text) >= TOKEN_CACHE_MIN_CHARS:
        key = hashlib.sha256(text.encode() + _tokenizer_fingerprint(tokenizer)).hexdigest()
        cached = cache_dir() / "tokens" / f"{key[:32]}.safetensors"
        if cached.exists():
            return safetensors.torch.load_file(cached)["ids"].long()
    # verbose=False: long texts are meant to exceed model_max_length; we cut them ourselves.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    if cached is not None:
        atomic_write(cached, safetensors.torch.save({"ids": ids.int()}))  # half the bytes
    return ids


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> bytes:
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers: the full spec
    spec = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return spec.encode()


def sample_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, n: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """``n`` random ``seq_len``-token windows, drawn exactly as the Wanda/SparseGPT code does."""
    ids = _token_ids(tokenizer, text)
    if len(ids) < seq_len + 1:
        raise OptlabError(f"text has {len(ids)} tokens; windows of {seq_len} need at least "
                          f"{seq_len + 1}")  # fmt: skip
    rng = random.Random(seed)  # same stream as the official random.seed(seed); random.randint
    starts = torch.tensor(
        [rng.randint(0, len(ids) - seq_len - 1) for _ in range(n)], dtype=torch.long
    )
    return ids[starts[:, None] + torch.arange(seq_len)]


def token_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int, limit: int | None = None
) -> torch.Tensor:
    """Consecutive non-overlapping ``seq_len``-token windows from the start (for perplexity)."""
    ids = _token_ids(tokenizer, text)
    k = len(ids) // seq_len
    if limit is not None:
        k = min(k, limit)
    if k < 1:
        raise OptlabError(f"text has {len(ids)} tokens; one window needs {seq_len}")
    return ids[: k * seq_len].view(k, seq_len)
