import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import optlab.commands  # noqa: F401  (registers the commands)
from optlab.api import Calibration, SparseGPTConfig, WandaConfig, prune, rerun
from optlab.cli import main
from optlab.core.calibration import Calibration as CoreCalibration
from optlab.core.job import Job, Result, load_job
from optlab.core.models import load_model
from optlab.errors import OptlabError
from optlab.eval.perplexity import PerplexityEval

TINY_CALIB = Calibration(corpus="book", n=4, seq_len=32)


def test_a_job_round_trips_through_its_dict() -> None:
    job = Job("prune", {"model": "tiny:llama"},
              {"method": SparseGPTConfig(pattern="2:4"), "calib": TINY_CALIB,
               "eval": PerplexityEval(limit=2)}, seed=3)  # fmt: skip
    data = yaml.safe_load(yaml.safe_dump(job.to_dict()))
    assert data["method"]["type"] == "sparsegpt" and data["calib"]["type"] == "calibration"
    assert Job.from_dict(data) == job


def test_partial_sections_take_the_commands_defaults() -> None:
    job = Job.from_dict({"command": "prune", "model": "tiny:llama",
                         "method": {"type": "sparsegpt", "damp": 0.05}})  # fmt: skip
    assert job.configs["method"] == SparseGPTConfig(damp=0.05)
    assert job.configs["calib"] == CoreCalibration() and job.seed == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"command": "prun", "model": "m"}, "Did you mean 'prune'"),
        ({"command": "prune"}, "prune needs MODEL"),
        ({"command": "prune", "model": "m", "method": {"type": "wandda"}}, "Did you mean 'wanda'"),
        (
            {"command": "prune", "model": "m", "method": {"damp": 0.1}},
            "unknown WandaConfig field 'damp'",
        ),
        ({"command": "prune", "model": "m", "calibration": {}}, "no setting 'calibration'"),
        ({"command": "prune", "model": "m", "calib": {"type": "wanda"}}, "must be a calibration"),
        ({"command": "prune", "model": "m", "calib": [1]}, "must be a mapping"),
        ([1, 2], "names no command"),
    ],
)
def test_bad_jobs_are_refused_with_one_clear_message(data, message) -> None:
    with pytest.raises(OptlabError, match=message):
        Job.from_dict(data)


def test_result_reads_like_its_metrics() -> None:
    result = Result({"perplexity": 3.0}, run=None)
    assert result["perplexity"] == 3.0 and dict(result) == {"perplexity": 3.0}
    with_run = Result({"x": 1}, run=__import__("pathlib").Path("r"))
    assert with_run.to_dict() == {"x": 1, "run": "r"}


def test_rerun_replays_a_run_to_the_same_masks(tmp_path) -> None:
    first = prune(load_model("tiny:llama"), WandaConfig(pattern="2:4"), calib=TINY_CALIB,
                  evaluation=PerplexityEval(limit=1, seq_len=32), seed=5,
                  out=tmp_path / "first", progress=False)  # fmt: skip
    assert first.run == tmp_path / "first" and first["sparsity"]["total"] == 0.5
    job = load_job(first.run)
    assert job.configs["method"] == WandaConfig(pattern="2:4") and job.seed == 5
    again = rerun(first.run, out=tmp_path / "again", progress=False)
    masks, replayed = (load_file(r.run / "masks.safetensors") for r in (first, again))
    assert masks.keys() == replayed.keys()
    assert all(torch.equal(masks[k], replayed[k]) for k in masks)
    assert again["perplexity"] == first["perplexity"]
    config = yaml.safe_load((again.run / "config.yaml").read_text())
    assert config == yaml.safe_load((first.run / "config.yaml").read_text())


def test_windows_given_in_python_are_recorded_but_not_replayed(tmp_path) -> None:
    lm = load_model("tiny:llama")
    windows = TINY_CALIB.windows(lm.tokenizer, 32, seed=0)
    result = prune(lm, WandaConfig(), calib=windows, out=tmp_path / "r", progress=False)
    assert yaml.safe_load((result.run / "config.yaml").read_text())["calib"] == {
        "given_in_python": [4, 32]
    }
    with pytest.raises(OptlabError, match=r"calib data was given in Python.*cannot be replayed"):
        rerun(result.run, out=tmp_path / "again")
    assert not (tmp_path / "again").exists()


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_flags_come_from_the_configs(capsys, tmp_path) -> None:
    out = tmp_path / "sg"
    code, stdout, _ = run_cli(capsys, "prune", "tiny:llama", "--method", "sparsegpt",
                              "--damp", "0.05", "--block-size", "16", "--calib", "book",
                              "--n-calib", "4", "--seq-len", "32", "--no-eval", "--out",
                              str(out), "--json")  # fmt: skip
    assert code == 0 and "perplexity" not in json.loads(stdout)
    job = load_job(out)
    assert job.configs["method"] == SparseGPTConfig(damp=0.05, block_size=16)
    assert job.configs["calib"] == Calibration(corpus="book", n=4, seq_len=32)
    assert job.configs["eval"] == PerplexityEval(enabled=False)
    code, stdout, _ = run_cli(capsys, "rerun", str(out), "--out", str(tmp_path / "again"),
                              "--json")  # fmt: skip
    assert code == 0 and json.loads(stdout)["run"] == str(tmp_path / "again")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "wanda", "--damp", "0.1"], "--damp is an option of sparsegpt, not of wanda"),
        (["--method", "wandda"], "Did you mean 'wanda'"),
        (["--n-calib", "0"], "n must be a whole number of at least 1, got 0"),
        (["--n-calib", "abc"], "--n-calib: expected a whole number, got 'abc'"),
        (["--sparsity", "nan"], "sparsity must be in [0, 1), got nan"),
        (["--group", "col"], "invalid choice: 'col'"),
        (["--dtype", "float8"], "invalid choice: 'float8'"),
    ],
)
def test_cli_errors_are_one_line(capsys, tmp_path, args, message) -> None:
    try:
        code = main(["prune", "tiny:llama", *args, "--out", str(tmp_path / "o")])
    except SystemExit as stop:  # argument errors exit from the parser
        code = stop.code
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("optlab: error:"), err
    assert message in lines[0]
    assert not (tmp_path / "o").exists()
