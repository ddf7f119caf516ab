"""Loaders for the real data shipped in packages, local text files and token windows."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch

from optlab.core import data
from optlab.core.models import byte_tokenizer, cache_dir
from optlab.errors import OptlabError


@pytest.fixture(scope="module")
def wiki() -> str:
    return data.wiki_text()


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


# ---- wiki ---------------------------------------------------------------------------------------


def test_wiki_split_is_disjoint_and_reconstructs_the_whole(wiki: str) -> None:
    calib, eval_ = data.load_text("wiki:calib"), data.load_text("wiki:eval")
    assert data.load_text("wiki") == wiki
    assert calib + "\n\n" + eval_ == wiki
    # The cut is the first blank line at or after 80% of the characters.
    assert len(calib) >= 0.8 * len(wiki)
    assert wiki.find("\n\n", int(0.8 * len(wiki))) == len(calib)
    assert len(eval_) > 0.1 * len(wiki)
    assert not eval_.startswith("\n") and not calib.endswith("\n")


def test_wiki_is_clean_prose(wiki: str) -> None:
    assert len(wiki.split()) > 300_000
    assert not re.search(r"''", wiki)
    for markup in ("[[", "]]", "{{", "}}", "<ref", "&nbsp;", "thumb|", "#REDIRECT", "\n\n\n"):
        assert markup not in wiki, markup
    assert not re.search(r"(?m)^(File|Image|Category):", wiki)
    assert not re.search(r"(?m)^=+.*=+$", wiki)  # headings are plain lines
    assert "Anarchism is a political philosophy" in wiki
    assert wiki == wiki.strip()


def test_wiki_text_reads_the_disk_cache(tmp_path, monkeypatch) -> None:
    assert (cache_dir() / "data" / "wiki.txt").read_text(encoding="utf-8") == data.wiki_text()
    monkeypatch.setenv("OPTLAB_CACHE", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "wiki.txt").write_text("first\n\nsecond", encoding="utf-8")
    data.wiki_text.cache_clear()
    try:
        assert data.wiki_text() == "first\n\nsecond"
    finally:
        data.wiki_text.cache_clear()


def test_split_text_needs_a_blank_line() -> None:
    assert data.split_text("a\n\nb\n\nc", 0.5) == ("a\n\nb", "c")
    with pytest.raises(OptlabError, match="blank line"):
        data.split_text("one paragraph only\n\nend", 0.9)


# ---- other corpora and local files --------------------------------------------------------------


def test_book_and_code_corpora() -> None:
    book = data.load_text("book")
    assert "young man" in book and "Project Gutenberg" not in book
    code = data.load_text("code")
    assert 1_800_000 < len(code) < 2_300_000
    assert "def " in code and "import " in code
    assert data.code_text() == code  # deterministic
    assert set(data.CORPORA) == {"wiki", "wiki:calib", "wiki:eval", "book", "code"}


def test_local_txt_and_jsonl(tmp_path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("héllo\nworld\n", encoding="utf-8")
    assert data.load_text(str(txt)) == "héllo\nworld\n"
    jsonl = tmp_path / "qa.jsonl"
    rows = [{"text": "plain text"}, {"question": "Capital of France?", "answer": "Paris"}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert data.load_text(str(jsonl)) == (
        "plain text\n\n### Question: Capital of France?\n ### Answer: Paris"
    )


def test_local_file_errors(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(OptlabError, match=r"bad\.jsonl:2"):
        data.load_text(str(bad))
    fieldless = tmp_path / "fieldless.jsonl"
    fieldless.write_text('{"text": "ok"}\n\n{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(OptlabError, match=r"fieldless\.jsonl:3.*'text'"):
        data.load_text(str(fieldless))
    missing = tmp_path / "missing.txt"
    with pytest.raises(OptlabError, match=re.escape(str(missing))):
        data.load_text(str(missing))
    with pytest.raises(OptlabError, match=r"Did you mean 'wiki:eval'.*Valid: book, code"):
        data.load_text("wiki:evl")


# ---- structured data ----------------------------------------------------------------------------


def test_lee_similarity() -> None:
    docs, sims = data.lee_similarity()
    assert len(docs) == 50 and all(len(d) > 100 for d in docs)
    assert "£" in "".join(docs)  # cp1252 decoded, not mojibake
    assert sims.shape == (50, 50)
    assert np.array_equal(sims, sims.T)
    assert sims.min() >= 0 and sims.max() <= 1
    assert np.all(np.diag(sims) == 1)
    off = sims[~np.eye(50, dtype=bool)]
    assert off.min() > 0  # the lower triangle was filled from the upper one, not left at 0
    assert sims[0, 1] == sims[1, 0] == pytest.approx(0.3)


def test_lee_background() -> None:
    docs = data.lee_background()
    assert len(docs) == 300
    assert all(d.strip() == d and len(d) > 100 for d in docs)


def test_word_pairs() -> None:
    ws = data.word_pairs("wordsim353")
    assert len(ws) == 353
    assert ws[0] == ("love", "sex", 6.77)
    sl = data.word_pairs("simlex999")
    assert len(sl) == 999
    assert sl[0] == ("old", "new", 1.58)
    for pairs in (ws, sl):
        assert all(isinstance(p.score, float) and 0 <= p.score <= 10 for p in pairs)
    with pytest.raises(OptlabError, match="simlex999"):
        data.word_pairs("simlex")


def test_analogy_questions() -> None:
    sections = data.analogy_questions()
    assert len(sections) == 14
    assert next(iter(sections)) == "capital-common-countries"
    assert sum(map(len, sections.values())) == 19544
    assert ("Athens", "Greece", "Baghdad", "Iraq") in sections["capital-common-countries"]
    assert all(len(q) == 4 for qs in sections.values() for q in qs)


def test_sentiment_sentences() -> None:
    sentences = data.sentiment_sentences()
    assert len(sentences) == 200
    assert sum(s.label for s in sentences) == 100
    assert {s.label for s in sentences} == {0, 1}
    assert not any("__label__" in s.text for s in sentences)
    assert sentences[0] == ("simplistic , silly and tedious .", 0)
    assert any("—" in s.text for s in sentences)  # cp1252 em dash decoded


def test_country_records() -> None:
    records = data.country_records()
    names = [r["name"] for r in records]
    assert len(records) > 200 and names == sorted(names) and len(set(names)) == len(names)
    france = next(r for r in records if r["name"] == "France")
    assert france["capital"] == "Paris"
    assert france["currencies"] == ["EUR"] and france["region"] == "Europe"
    assert "DEU" in france["borders"] and france["iso3"] == "FRA"
    assert all(isinstance(r.get("capital", ""), str) for r in records)


# ---- token windows ------------------------------------------------------------------------------


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_sample_windows_matches_the_official_sampler(tok, wiki: str) -> None:
    text = wiki[:20_000]
    ids = _ids(tok, text)
    assert len(ids) == len(text.encode())  # one token per byte
    n, seq_len = 8, 64
    windows = data.sample_windows(tok, text, n, seq_len, seed=3)
    assert windows.shape == (n, seq_len) and windows.dtype == torch.long
    # Reference: what the Wanda / SparseGPT loaders do.
    state = random.getstate()
    try:
        random.seed(3)
        starts = [random.randint(0, len(ids) - seq_len - 1) for _ in range(n)]
    finally:
        random.setstate(state)
    assert windows.tolist() == [ids[s : s + seq_len] for s in starts]
    # Independently: each window is a contiguous piece of the tokenized text.
    assert all(bytes(w) in bytes(ids) for w in windows.tolist())


def test_sample_windows_is_seeded(tok, wiki: str) -> None:
    text = wiki[:20_000]
    a = data.sample_windows(tok, text, 4, 32)
    assert torch.equal(a, data.sample_windows(tok, text, 4, 32, seed=0))
    assert not torch.equal(a, data.sample_windows(tok, text, 4, 32, seed=1))
    assert data.sample_windows(tok, text, 0, 32).shape == (0, 32)


def test_sample_windows_too_short(tok) -> None:
    with pytest.raises(OptlabError, match=r"10 tokens.*at least 11"):
        data.sample_windows(tok, "x" * 10, 1, 10)
    assert data.sample_windows(tok, "x" * 11, 2, 10).shape == (2, 10)


def test_long_text_does_not_warn(tok) -> None:
    original, tok.model_max_length = tok.model_max_length, 16
    try:
        data.sample_windows(tok, "y" * 100, 1, 8)
        assert not tok.deprecation_warnings.get(
            "sequence-length-is-longer-than-the-specified-maximum"
        )
    finally:
        tok.model_max_length = original


def test_token_windows(tok) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    ids = _ids(tok, text)
    windows = data.token_windows(tok, text, 64)
    assert windows.shape == (1000 // 64, 64)  # remainder dropped
    assert windows.flatten().tolist() == ids[: 15 * 64]  # consecutive from the start
    assert data.token_windows(tok, text, 64, limit=3).tolist() == windows[:3].tolist()
    assert data.token_windows(tok, text, 1000).shape == (1, 1000)
    with pytest.raises(OptlabError, match="1000 tokens; one window needs 1001"):
        data.token_windows(tok, text, 1001)


def test_long_texts_are_tokenized_once_into_the_disk_cache(tok, wiki, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTLAB_CACHE", str(tmp_path))
    text = wiki[: data.TOKEN_CACHE_MIN_CHARS]
    first = data.token_windows(tok, text, 64)
    assert first.flatten().tolist() == _ids(tok, text)[: first.numel()]
    assert len(list((tmp_path / "tokens").iterdir())) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cached ids should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(type(tok), "__call__", no_tokenizing)
        assert torch.equal(data.token_windows(tok, text, 64), first)
    other = byte_tokenizer()
    other.add_tokens(["zzz"])  # another vocabulary: another cache entry
    data.token_windows(other, text, 64)
    assert len(list((tmp_path / "tokens").iterdir())) == 2
