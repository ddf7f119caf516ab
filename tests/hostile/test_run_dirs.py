"""Run directories cannot lose data: what --out may be, --force, races, signals, leftovers."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest

from optlab.core.run import Run, clean_stale_partials, stale_partials
from optlab.errors import OptlabError

from .conftest import error_line, run_cli, snapshot


def eval_args(text: Path, out: object) -> list[object]:
    return ["eval", "tiny:opt", "--tasks", f"ppl:{text}", "--seq-len", "32", "--limit", "1",
            "--out", out]  # fmt: skip


@pytest.mark.parametrize("out", [".", "..", "CWD", "HOME", "/", "ANCESTOR"])
@pytest.mark.parametrize("command", ["eval", "prune --force"])
def test_out_that_would_hold_more_than_a_run_is_refused(
    capsys, tmp_path, monkeypatch, text_file, out, command
) -> None:
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    (work / "precious.txt").write_text("keep me")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    out = {"CWD": str(work), "HOME": str(tmp_path / "home"),
           "ANCESTOR": str(tmp_path / "work")}.get(out, out)  # fmt: skip
    before = snapshot(tmp_path)
    if command == "eval":
        args = eval_args(text_file, out)
    else:
        args = ["prune", "tiny:opt", "--method", "magnitude", "--no-eval", "--force", "--out", out]
    error_line(*run_cli(capsys, *args)[::2], f"--out {out!r}")
    assert snapshot(tmp_path) == before


def test_force_replaces_only_an_optlab_run(capsys, tmp_path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 not a run")
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "prune", "tiny:opt", "--method", "magnitude", "--no-eval",
                           "--force", "--out", folder)  # fmt: skip
    error_line(code, err, repr(str(folder)), "not an optlab run")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("force", [False, True])
def test_out_that_is_a_file_does_not_advise_force(capsys, tmp_path, text_file, force) -> None:
    target = tmp_path / "notes.md"
    target.write_text("my notes")
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *eval_args(text_file, target), *(["--force"] * force))
    line = error_line(code, err, repr(str(target)), "exists and is a file")
    assert "--force" not in line
    assert snapshot(tmp_path) == before


def test_out_under_a_file_or_a_dangling_link(capsys, tmp_path, text_file) -> None:
    (tmp_path / "file.txt").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *eval_args(text_file, tmp_path / "file.txt" / "sub" / "run"))
    error_line(code, err, repr(str(tmp_path / "file.txt")), "is a file, not a folder")
    code, _, err = run_cli(capsys, *eval_args(text_file, link))
    error_line(code, err, repr(str(link)), "symbolic link", "does not exist")
    assert snapshot(tmp_path) == before


def test_out_where_nothing_can_be_written(capsys, tmp_path, text_file) -> None:
    code, _, err = run_cli(capsys, *eval_args(text_file, "/proc/optlab-hostile/run"))
    error_line(code, err, "/proc/optlab-hostile/run")
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs a plain user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = run_cli(capsys, *eval_args(text_file, locked / "run"))
        error_line(code, err, repr(str(locked)), "no permission")
        assert list(locked.iterdir()) == []


def test_a_run_that_appeared_meanwhile_is_never_replaced(tmp_path) -> None:
    target = tmp_path / "r"
    first, second = Run(target, config={"v": 1}), Run(target, config={"v": 2})
    first.add_metrics({"v": 1})
    first.finish()
    kept = snapshot(target)
    with pytest.raises(OptlabError, match="appeared while this run worked"), second:
        second.add_metrics({"v": 2})
    assert snapshot(target) == kept
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # the second stage is gone


def test_the_same_command_twice_at_once_writes_once(tmp_path, text_file, spawn) -> None:
    args = ["eval", "tiny:opt", "--tasks", f"ppl:{text_file}", "--seq-len", "32",
            "--out", tmp_path / "run"]  # fmt: skip
    processes = [spawn(*args) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]  # type: ignore[union-attr]
    assert sorted(code for code, _ in results) == [0, 2], results
    for code, err in results:
        if code == 2:
            error_line(code, err, repr(str(tmp_path / "run")))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["run", "text.txt"]


def _wait_for_stage(parent: Path, process, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stages = [p for p in parent.glob(".*.partial-*")]
        if stages and (stages[0] / "env.json").exists():
            return stages[0]
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    raise AssertionError("the run never started")


@pytest.fixture
def long_text(tmp_path: Path) -> Path:
    path = tmp_path / "long.txt"  # scoring takes many seconds: time to send a signal
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40_000, encoding="utf-8")
    return path


def test_sigterm_removes_the_staged_run(tmp_path, long_text, spawn) -> None:
    out = tmp_path / "runs" / "r"
    process = spawn("eval", "tiny:opt", "--tasks", f"ppl:{long_text}", "--out", out)
    _wait_for_stage(out.parent, process)
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=120)
    err = process.stderr.read()  # type: ignore[union-attr]
    assert code == 130 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("optlab:")] == [
        "optlab: interrupted"
    ]
    assert list(out.parent.iterdir()) == []


def test_a_killed_run_leaves_a_stage_that_is_reported_and_cleaned(
    tmp_path, long_text, caplog, spawn
) -> None:
    out = tmp_path / "runs" / "r"
    process = spawn("eval", "tiny:opt", "--tasks", f"ppl:{long_text}", "--out", out)
    stage = _wait_for_stage(out.parent, process)
    process.kill()
    process.wait(timeout=60)
    assert stale_partials(out.parent) == [stage]
    with (
        caplog.at_level(logging.WARNING, logger="optlab"),
        Run(out.parent / "other", config={}) as run,
    ):
        assert stale_partials(out.parent) == [stage]  # the live stage is not stale
        assert run.dir not in stale_partials(out.parent)
    assert stage.name in caplog.text and "clean_stale_partials" in caplog.text
    assert clean_stale_partials(out.parent) == [stage]
    assert sorted(p.name for p in out.parent.iterdir()) == ["other"]


def _wait_for_new_stage(parent: Path, process, old: list[Path], timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stages = [p for p in parent.glob(".*.partial-*") if p not in old]
        if stages and (stages[0] / "env.json").exists():
            return stages[0]
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    raise AssertionError("the run never started")


@pytest.mark.parametrize("command", ["eval", "rerun", "run"])
def test_clean_stale_removes_dead_stages_and_never_a_live_one(
    capsys, tmp_path, long_text, text_file, prune_run, spawn, command
) -> None:
    runs = tmp_path / "runs"
    dead = spawn("eval", "tiny:opt", "--tasks", f"ppl:{long_text}", "--out", runs / "dead")
    stage = _wait_for_new_stage(runs, dead, [])
    dead.kill()  # SIGKILL: no chance to clean up
    dead.wait(timeout=60)
    live = spawn("eval", "tiny:opt", "--tasks", f"ppl:{long_text}", "--out", runs / "live")
    live_stage = _wait_for_new_stage(runs, live, [stage])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny:opt\nsteps:\n  - {name: e, command: eval, tasks: "
                      f"{{tasks: ['ppl:{text_file}'], seq_len: 32, limit: 1}}}}\n")  # fmt: skip
    args = {"eval": eval_args(text_file, runs / "a")[:-2], "rerun": ["rerun", prune_run],
            "run": ["run", recipe]}[command]  # fmt: skip
    code, _, err = run_cli(capsys, *args, "--out", runs / "a")
    assert code == 0, err
    assert stage.name in err and "--clean-stale" in err  # reported, not removed
    assert stage.exists()
    code, _, err = run_cli(capsys, *args, "--out", runs / "b", "--clean-stale")
    assert code == 0, err
    assert f"removed {stage}" in err and not stage.exists()
    assert live_stage.exists() and live.poll() is None  # a live run's stage is never touched
    assert str(live_stage) not in err


def test_clean_stale_is_offered_by_every_command_that_writes_a_run(capsys) -> None:
    for args in (["prune"], ["eval"], ["unlearn", "sweep"], ["audit", "skeb"], ["run"],
                 ["rerun"], ["demo"]):  # fmt: skip
        code, out, _ = run_cli(capsys, *args, "--help")
        assert code == 0 and "--clean-stale" in out, args
