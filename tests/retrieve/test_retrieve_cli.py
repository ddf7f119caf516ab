"""The chain from the command line: one run folder with every stage, the stages one by one,
the cross-model evaluation, and bad input refused with one line before anything is written."""

from __future__ import annotations

import json

import pytest

from optlab.cli import main
from optlab.retrieve.infer import PromptIndex
from tests.conftest import RETRIEVE_TINY
from tests.hostile.conftest import error_line, run_cli, snapshot


def test_one_run_holds_every_stage_and_no_held_out_prompt(retrieve_run) -> None:
    from sentence_transformers import SentenceTransformer

    tasks = json.loads((retrieve_run / "tasks.json").read_text())
    assert tasks["hold_out"] == "topic" and {e["cluster"] for e in tasks["test"]} == {"topic"}
    assert {e["cluster"] for e in tasks["pool"]} == {"sentiment"}  # never the held-out one
    index = PromptIndex.load(retrieve_run / "index.faiss")
    assert len(index) == len(tasks["pool"]) == 6
    for name in ("input_encoder", "prompt_encoder"):
        encoder = SentenceTransformer(str(retrieve_run / name), device="cpu")
        assert encoder.encode(["a test"]).shape == (1, 384)
    metrics = json.loads((retrieve_run / "metrics.json").read_text())
    assert metrics["score"]["scored_examples"] == 6
    assert set(metrics["eval"]["average"]) == {"zero", "uprise"}
    for row in metrics["eval"]["tasks"].values():
        low, high = row["uprise"]["ci95"]
        assert low <= row["uprise"]["mean"] <= high
    scores = [json.loads(line) for line in (retrieve_run / "scores.jsonl").read_text().splitlines()]
    assert all(len(r["candidates"]) == 3 for r in scores)
    assert not list(retrieve_run.parent.glob(".uprise.scores-*"))  # the cache is merged, gone


def test_the_stages_one_by_one_and_another_lm(tmp_path, retrieve_run) -> None:
    assert main(["retrieve", "index", str(retrieve_run), "--out", str(tmp_path / "i")]) == 0
    assert main(["retrieve", "eval", str(tmp_path / "i"), "--lm", "tiny:opt", "--methods",
                 "zero,random,bm25,uprise", "--k", "2", "--bootstrap", "20", "--out",
                 str(tmp_path / "e")]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["lm"] == "tiny:opt" and metrics["test_examples"] == 2
    assert set(metrics["average"]) == {"zero", "random", "bm25", "uprise"}


def test_unknown_cluster_is_one_line_with_did_you_mean(capsys, tmp_path) -> None:
    code, out, err = run_cli(capsys, "retrieve", "run", "tiny:llama", "--hold-out", "topik",
                             "--out", tmp_path / "o")  # fmt: skip
    error_line(code, err, "'topik'", "Did you mean 'topic'")
    assert out == "" and list(tmp_path.iterdir()) == []


def test_a_task_file_without_gold_is_one_line(capsys, tmp_path) -> None:
    bad = tmp_path / "quiz.jsonl"
    bad.write_text(json.dumps({"context": "2+2=", "choices": [" 4", " 5"]}) + "\n")
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, "retrieve", "score", "tiny:llama", "--task-files",
                             f"mc:{bad}@math", "--out", tmp_path / "o")  # fmt: skip
    error_line(code, err, "quiz.jsonl:1", "gold")
    assert out == "" and snapshot(tmp_path) == before


@pytest.mark.parametrize("stage", ["run", "eval"])
def test_k_larger_than_the_pool_is_one_line(capsys, tmp_path, retrieve_run, stage) -> None:
    before = snapshot(retrieve_run)
    head = (["retrieve", "run", "tiny:llama", *RETRIEVE_TINY] if stage == "run" else
            ["retrieve", "eval", retrieve_run])  # fmt: skip
    code, out, err = run_cli(capsys, *head, "--k", "7", "--out", tmp_path / "o")
    error_line(code, err, "--k 7", "6 prompts")
    assert out == "" and list(tmp_path.iterdir()) == [] and snapshot(retrieve_run) == before


def test_a_run_of_the_wrong_stage_is_named(capsys, tmp_path, retrieve_run) -> None:
    code, _, err = run_cli(capsys, "retrieve", "train", tmp_path, "--out", tmp_path / "o")
    error_line(code, err, "tasks.json", "retrieve score")
