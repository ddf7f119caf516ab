"""Every reader of a user's file: undecodable bytes, folders, empty and missing files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from optlab.core.data import read_jsonl, read_text_file
from optlab.errors import OptlabError

from .conftest import error_line, run_cli, snapshot

LATIN1 = "Caf\xe9 au lait, na\xefve r\xe9sum\xe9.\n".encode("latin-1")  # byte 0xe9 at offset 3
QA = '{"question": "What is A?", "answer": "B"}\n'


def latin1(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    jsonl = b'{"text": "' + LATIN1[:-1] + b'"}\n'
    path.write_bytes(jsonl if name.endswith(".jsonl") else LATIN1)
    return path


def good(tmp_path: Path, name: str, text: str = QA * 2) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def commands(tmp: Path, bad: Path, prune_run: Path) -> dict[str, list[object]]:
    forget, retain = good(tmp, "forget.jsonl"), good(tmp, "retain.jsonl")
    entities = good(tmp, "entities.txt", "France\nParis\n")
    unlearn = ["unlearn", "tiny:opt", "--steps", "1", "--no-save"]
    return {
        "mc": ["eval", "tiny:opt", "--tasks", f"mc:{bad.with_suffix('.jsonl')}"],
        "ppl": ["eval", "tiny:opt", "--tasks", f"ppl:{bad.with_suffix('.txt')}"],
        "forget": [*unlearn, "--forget", bad.with_suffix(".jsonl"), "--retain", retain],
        "retain": [*unlearn, "--forget", forget, "--retain", bad.with_suffix(".txt")],
        "holdout": [
            *unlearn,
            "--forget",
            forget,
            "--retain",
            retain,
            "--holdout",
            bad.with_suffix(".jsonl"),
        ],
        "harm-labels": [
            *unlearn,
            "--forget",
            forget,
            "--retain",
            retain,
            "--harm-labels",
            bad.with_suffix(".jsonl"),
        ],
        "reliability": ["audit", "reliability", bad.with_suffix(".csv")],
        "calib": [
            "prune",
            "tiny:opt",
            "--n-calib",
            "2",
            "--seq-len",
            "16",
            "--calib",
            bad.with_suffix(".txt"),
        ],
        "corpus": ["retrain", prune_run, "--steps", "1", "--corpus", bad.with_suffix(".txt")],
        "graph-corpus": [
            "audit",
            "graph",
            "--corpus",
            bad.with_suffix(".txt"),
            "--entities",
            entities,
        ],
        "graph-entities": [
            "audit",
            "graph",
            "--corpus",
            entities,
            "--entities",
            bad.with_suffix(".txt"),
        ],
        "forgotten": ["audit", "skeb", "tiny:opt", "--forgotten", bad.with_suffix(".jsonl")],
        "prompts": ["audit", "skeb", "tiny:opt", "--prompts", bad.with_suffix(".jsonl")],
    }


READERS = ["mc", "ppl", "forget", "retain", "holdout", "harm-labels", "reliability", "calib",
           "corpus", "graph-corpus", "graph-entities", "forgotten", "prompts"]  # fmt: skip


@pytest.mark.parametrize("reader", READERS)
def test_a_file_that_is_not_utf8_is_one_line(capsys, tmp_path, prune_run, reader) -> None:
    bad = tmp_path / "bad"
    for suffix in (".jsonl", ".txt", ".csv"):
        latin1(tmp_path, "bad" + suffix)
    args = commands(tmp_path, bad, prune_run)[reader]
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "o")
    error_line(code, err, "bad.", "not UTF-8", "0xe9", "offset")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("reader", ["mc", "ppl", "forget", "calib", "reliability", "prompts"])
def test_a_folder_given_as_a_file(capsys, tmp_path, prune_run, reader) -> None:
    bad = tmp_path / "bad"
    for suffix in (".jsonl", ".txt", ".csv"):
        (tmp_path / f"bad{suffix}").mkdir()
    args = commands(tmp_path, bad, prune_run)[reader]
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "o")
    line = error_line(code, err, "bad.", "is a folder, not a file")
    assert "not found" not in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("reader", ["ppl", "forget", "calib", "reliability", "prompts"])
def test_an_empty_file_where_content_is_needed(capsys, tmp_path, prune_run, reader) -> None:
    bad = tmp_path / "bad"
    for suffix in (".jsonl", ".txt", ".csv"):
        good(tmp_path, "bad" + suffix, "\n  \n")
    args = commands(tmp_path, bad, prune_run)[reader]
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "o")
    error_line(code, err, "bad.", "empty")
    assert snapshot(tmp_path) == before


def test_read_text_file(tmp_path) -> None:
    path = good(tmp_path, "a.txt", "one\r\ntwo\n")
    assert read_text_file(path, "notes") == "one\ntwo\n"  # as text mode reads it
    with pytest.raises(OptlabError, match=r"notes not found: .*missing.txt.* \(no such file\)"):
        read_text_file(tmp_path / "missing.txt", "notes")
    with pytest.raises(OptlabError, match="byte 0xe9 at offset 3"):
        read_text_file(latin1(tmp_path, "l.txt"), "notes")
    assert read_text_file(good(tmp_path, "e.txt", ""), "notes", allow_empty=True) == ""
    with pytest.raises(OptlabError, match=r"bad\.jsonl:2: not valid JSON"):
        list(read_jsonl(good(tmp_path, "bad.jsonl", QA + "{oops\n")))


def _spoil_json(path: Path, how: str) -> None:
    if how == "folder":
        path.unlink(missing_ok=True)
        path.mkdir()
    else:
        path.write_bytes({"latin1": LATIN1, "bad JSON": b'{"scores": ', "a list": b"[1, 2]"}[how])


JSON_SPOILS = {"latin1": "not UTF-8", "folder": "is a folder", "bad JSON": "not valid JSON",
               "a list": "JSON list"}  # fmt: skip


@pytest.mark.parametrize("how", list(JSON_SPOILS))
@pytest.mark.parametrize("reader", ["scores-from", "source metrics"])
def test_a_spoiled_json_of_a_run_is_one_line(capsys, tmp_path, prune_run, reader, how) -> None:
    run = tmp_path / "run"
    shutil.copytree(prune_run, run)
    if reader == "scores-from":
        name = "sensitivity.json"
        args = ["quantize", "tiny:opt", "--avg-bits", "4", "--n-calib", "2", "--no-eval",
                "--scores-from", run]  # fmt: skip
    else:
        name = "metrics.json"
        args = ["retrain", run, "--steps", "1", "--no-eval"]
    _spoil_json(run / name, how)
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "o")
    error_line(code, err, name, JSON_SPOILS[how])
    assert snapshot(tmp_path) == before
