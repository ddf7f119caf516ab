"""``optlab exit generate`` and ``exit_generate``: prompts, the exit set, runs, bad input."""

from __future__ import annotations

import json

import pytest

from optlab.api import GenerateConfig, PromptsConfig, exit_generate
from optlab.cli import main
from optlab.core.models import load_model
from optlab.early_exit.exits import record_exits
from optlab.errors import OptlabError


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny:gpt2")


def cli(capsys, *args: object) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:  # argparse's own refusals
        code = int(stop.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_command_writes_each_sample_and_speculation_matches_full_greedy(capsys, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"context": "def f(x):"}\n{"prompt": "import os"}\n', encoding="utf-8")
    runs = {}
    for name, flags in (("full", []), ("spec", ["--speculative", "1", "--draft-tokens", "3"]),
                        ("exit", ["--exit", "fixed:1", "--kv", "recompute"])):  # fmt: skip
        code, out, err = cli(capsys, "exit", "generate", "tiny:gpt2", "--in", prompts, "--json",
                             "--max-new-tokens", "6", *flags, "--out", tmp_path / name)  # fmt: skip
        assert code == 0, err
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
        assert json.loads(out)["mean"] == runs[name]["mean"]
    full, spec, exit1 = runs["full"], runs["spec"], runs["exit"]
    assert [s["prompt"] for s in full["samples"].values()] == ["def f(x):", "import os"]
    assert [s["text"] for s in spec["samples"].values()] == \
        [s["text"] for s in full["samples"].values()]  # fmt: skip
    assert 0 <= spec["mean"]["acceptance"] <= 1 and full["mean"]["layers"] == 2
    assert exit1["mean"]["layers"] == 1 and all(
        s["executed_layers"] == [1] * s["tokens"] for s in exit1["samples"].values()
    )


def test_the_exits_of_an_exit_train_run_are_used(lm) -> None:
    trained = load_model("tiny:llama")
    record_exits(trained.model, (1, 2), (0.5, 0.5), "uniform")  # what `exit train` stores
    result = exit_generate(trained, GenerateConfig(exit="confidence", tau=1e-6,
                           max_new_tokens=3), ["def"], progress=False)  # fmt: skip
    assert result["samples"]["1"]["executed_layers"] == [1, 1, 1]
    record_exits(trained.model, (2,), (1.0,), "uniform")  # no exit below the last: all layers
    result = exit_generate(trained, GenerateConfig(exit="confidence", tau=1e-6,
                           max_new_tokens=3), ["def"], progress=False)  # fmt: skip
    assert result["samples"]["1"]["executed_layers"] == [2, 2, 2]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--exit", "fixed:5"], "exit layer 5 is outside the model"),
        (["--exit", "confidence", "--exits", "1,3"], "exit layer 3 is outside the model"),
        (["--exit", "confidence", "--tau", "1"], "--tau must be in (0, 1)"),
        (["--exit", "confidence", "--tau", "-0.2"], "--tau must be in (0, 1)"),
        (["--speculative", "2"], "must be in 1..1"),
        (["--speculative", "0"], "--speculative must be a layer of at least 1"),
        (["--speculative", "1", "--exit", "confidence"], "it takes no --exit"),
        (["--exit", "sometimes"], "choose none, fixed:L, confidence or policy"),
        (["--exit", "policy"], "--policy DIR"),
        (["--kv", "paste"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(capsys, tmp_path, flags, needle):
    code, out, err = cli(capsys, "exit", "generate", "tiny:gpt2", "--prompt", "def", *flags,
                         "--out", tmp_path / "o")  # fmt: skip
    assert code == 2 and out == "" and needle in err
    assert err.count("\n") == 1 and err.startswith("optlab: error:")
    assert list(tmp_path.iterdir()) == []


def test_prompts_come_from_exactly_one_place(tmp_path) -> None:
    with pytest.raises(OptlabError, match="exactly one of --prompt TEXT and --in FILE"):
        PromptsConfig()
    with pytest.raises(OptlabError, match="exactly one"):
        PromptsConfig(prompt="a", file="b.txt")
    lines = tmp_path / "p.txt"
    lines.write_text("def f():\n\nclass A:\n", encoding="utf-8")
    assert PromptsConfig(file=str(lines)).texts() == ["def f():", "class A:"]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"target": "x"}\n', encoding="utf-8")
    with pytest.raises(OptlabError, match=r"p\.jsonl:1: expected an object with a 'context'"):
        PromptsConfig(file=str(bad)).texts()
