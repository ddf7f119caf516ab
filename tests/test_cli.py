import json
import subprocess
import sys

import pytest

from optlab.cli import main


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_json(capsys) -> None:
    code, out, _ = run_cli(capsys, "info", "tiny:gpt2", "--json")
    info = json.loads(out)
    assert code == 0
    assert (info["family"], info["blocks"], info["linears_per_block"]) == ("gpt2", 2, 4)
    assert info["linears"]["mlp.c_fc"] == "256x64"  # Conv1D shown as out x in


def test_eval_writes_a_run_and_refuses_to_overwrite_it(capsys, tmp_path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    out_dir = tmp_path / "run"
    args = ["eval", "tiny:opt", "--tasks", f"ppl:{text}", "--seq-len", "64", "--json"]
    code, out, _ = run_cli(capsys, *args, "--out", str(out_dir))
    result = json.loads(out)
    assert code == 0 and result["run"] == str(out_dir)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["tasks"][f"ppl:{text}"]["windows"] == 900 // 64
    assert {"config.yaml", "env.json", "log.txt", "report.md"} <= {
        p.name for p in out_dir.iterdir()
    }

    code, out, err = run_cli(capsys, *args, "--out", str(out_dir))
    assert code == 2 and out == "" and "exists; pass --force" in err
    code, _, _ = run_cli(capsys, *args, "--out", str(out_dir), "--force")
    assert code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "tiny:opt", "--tasks", "ppl:wikki"], "Did you mean 'ppl:wiki'"),
        (["eval", "tiny:opt", "--tasks", "ppl:missing/file.txt"], "no such file"),
        (["eval", "tiny:opt", "--tasks", ","], "--tasks is empty"),
        (["eval", "tiny:opt", "--seq-len", "100000"], "exceeds the model's context"),
        (["info", "tiny:nope"], "unknown tiny model family 'nope'"),
        (["info", "random:opt-999b"], "unknown random shape"),
        (["info", "tiny:opt", "--device", "cuda:7"], "no CUDA GPU"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(capsys, tmp_path, args, message) -> None:
    code, out, err = run_cli(capsys, *args, "--out", str(tmp_path / "o")) if args[0] == "eval" \
        else run_cli(capsys, *args)  # fmt: skip
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("optlab: error:") and message in lines[-1]
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_argument_errors_exit_2_with_one_line(capsys) -> None:
    assert main(["eval", "tiny:opt", "--limit", "0"]) == 2
    assert capsys.readouterr().err == (
        "optlab: error: limit must be a whole number of at least 1, got 0\n"
    )
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "tiny:opt", "--limit", "two"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--limit: expected a whole number, got 'two'" in err


def test_help_teaches_the_model_specs(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    for piece in ("random:SHAPE", "tiny:FAMILY", "ppl:wiki", "mc:sentiment", "--seq-len"):
        assert piece in text


def test_console_entry_point_keeps_stdout_for_json() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "optlab.cli", "info", "tiny:llama", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["family"] == "llama"
