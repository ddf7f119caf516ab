"""Loading models and runs: damaged files, non-finite weights, the wrong kind of run."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from optlab.core.anatomy import Anatomy
from optlab.core.models import check_finite_weights, load_model, save_model
from optlab.core.run import require_run_kind
from optlab.errors import OptlabError

from .conftest import error_line, run_cli, snapshot


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "truncated weights": ("model.safetensors", _truncate, "damaged or not safetensors"),
    "random weights": (
        "model.safetensors",
        lambda p: p.write_bytes(os.urandom(4096)),
        "damaged or not safetensors",
    ),
    "no weights": ("model.safetensors", Path.unlink, "model.safetensors"),
    "malformed config": (
        "config.json",
        lambda p: p.write_text('{"model_type": '),
        "not valid JSON",
    ),
    "config not UTF-8": ("config.json", lambda p: p.write_bytes(b'{"a": "\xff"}'), "UTF-8"),
    "config of no model": ("config.json", lambda p: p.write_text("{}"), "cannot load model"),
}


@pytest.mark.parametrize("kind", ["plain", "quantized"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_model_folder_is_one_line(
    capsys, tmp_path, prune_run, quant_run, kind, damage
) -> None:
    run = tmp_path / "run"
    shutil.copytree(prune_run if kind == "plain" else quant_run, run)
    name, damage_it, message = DAMAGES[damage]
    damage_it(run / "model" / name)
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "eval", run, "--tasks", "ppl:wiki", "--limit", "1")
    error_line(code, err, message)
    assert snapshot(tmp_path) == before


@pytest.fixture
def nan_model(tmp_path: Path) -> Path:
    lm = load_model("tiny:opt")
    block = Anatomy.of(lm.model).blocks[0]
    with torch.no_grad():
        next(iter(Anatomy.of(lm.model).linears(block).values())).weight[0, :3] = float("nan")
    return save_model(lm, tmp_path / "nan-model")


def test_non_finite_weights_are_found_warned_and_refused(capsys, tmp_path, nan_model) -> None:
    lm = load_model(str(nan_model))
    assert check_finite_weights(lm.model) == ["model.decoder.layers.0.self_attn.k_proj.weight"]
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    code, _, err = run_cli(capsys, "eval", nan_model, "--tasks", f"ppl:{text}", "--seq-len", "32")
    assert code == 0 and "NaN or infinite" in err and "k_proj" in err  # reported, with warning
    before = snapshot(tmp_path)
    for args in (["prune", nan_model, "--method", "wanda", "--n-calib", "2", "--seq-len", "16"],
                 ["prune", nan_model, "--method", "sparsegpt", "--n-calib", "2", "--seq-len", "16"],
                 ["quantize", nan_model, "--uniform", "8", "--no-eval"]):  # fmt: skip
        code, _, err = run_cli(capsys, *args, "--out", tmp_path / "o")
        error_line(code, err, "NaN or infinite", "k_proj")
    assert snapshot(tmp_path) == before


def test_check_finite_weights_on_a_clean_model(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="optlab"):
        lm = load_model("tiny:llama")
    assert check_finite_weights(lm.model) == [] and "NaN" not in caplog.text


def _fake_run(tmp_path: Path, source: Path, command: str) -> Path:
    run = tmp_path / command
    shutil.copytree(source, run)
    config = (run / "config.yaml").read_text().replace("command: prune", f"command: {command}")
    (run / "config.yaml").write_text(config)
    return run


@pytest.mark.parametrize("source", ["quantize", "unlearn", "eval"])
def test_retrain_needs_a_prune_run(capsys, tmp_path, prune_run, quant_run, source) -> None:
    run = quant_run if source == "quantize" else _fake_run(tmp_path, prune_run, source)
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "retrain", run, "--steps", "1", "--out", tmp_path / "o")
    error_line(code, err, repr(str(run)), f"'{source}' run", "prune or retrain")
    assert snapshot(tmp_path) == before


def test_a_run_config_with_python_tags_is_refused(capsys, tmp_path, prune_run) -> None:
    run = tmp_path / "run"
    shutil.copytree(prune_run, run)
    (run / "config.yaml").write_text("command: !!python/object/apply:os.system ['touch pwned']\n")
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "retrain", run, "--steps", "1", "--out", tmp_path / "o")
    error_line(code, err, "config.yaml", "python/object")
    assert snapshot(tmp_path) == before and not Path("pwned").exists()
    (run / "config.yaml").write_bytes(b"command: prune\nmodel: caf\xe9\n")
    code, _, err = run_cli(capsys, "retrain", run, "--steps", "1", "--out", tmp_path / "o")
    error_line(code, err, "config.yaml", "not UTF-8")


def test_require_run_kind(tmp_path, prune_run) -> None:
    assert require_run_kind(prune_run, {"prune"}, "retrain")["command"] == "prune"
    with pytest.raises(OptlabError, match=r"retrain needs a quantize run; .* is a 'prune' run"):
        require_run_kind(prune_run, {"quantize"}, "retrain")
    with pytest.raises(OptlabError, match="is not a run directory"):
        require_run_kind(tmp_path, {"prune"}, "retrain")


def test_quantize_refuses_nan_weights_before_measuring(capsys, tmp_path, monkeypatch, nan_model):
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("perplexity measured on a model that is refused")

    monkeypatch.setattr("optlab.eval.perplexity.wiki_perplexity", never)
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "quantize", nan_model, "--uniform", "8", "--eval-limit", "1",
                           "--out", tmp_path / "o")  # fmt: skip
    error_line(code, err, "NaN or infinite", "k_proj")
    assert snapshot(tmp_path) == before


def _no_tokenizer(model: Path) -> None:
    for path in model.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            path.unlink()


def _empty_tokenizer(model: Path) -> None:
    _no_tokenizer(model)
    (model / "tokenizer_config.json").write_text("{}")


@pytest.mark.parametrize("command", ["eval", "prune"])
@pytest.mark.parametrize("kind", ["plain", "quantized"])
@pytest.mark.parametrize(
    ("damage", "message"),
    [(_no_tokenizer, "has no tokenizer files"), (_empty_tokenizer, "has 1 token")],
)
def test_a_model_folder_without_its_tokenizer_is_refused(
    capsys, tmp_path, prune_run, quant_run, kind, damage, message, command
) -> None:
    """transformers builds an empty tokenizer for such a folder: every text is 0 tokens."""
    run = tmp_path / "run"
    shutil.copytree(prune_run if kind == "plain" else quant_run, run)
    damage(run / "model")
    before = snapshot(tmp_path)
    args = {"eval": ["eval", run, "--tasks", "ppl:wiki", "--limit", "1", "--seq-len", "32"],
            "prune": ["prune", run / "model", "--method", "magnitude", "--no-eval",
                      "--out", tmp_path / "o"]}[command]  # fmt: skip
    code, _, err = run_cli(capsys, *args)
    error_line(code, err, "model", message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "args",
    [
        ["prune", "QUANT", "--method", "magnitude", "--no-eval"],
        ["prune", "QUANT", "--method", "wanda", "--n-calib", "2", "--seq-len", "16"],
        ["quantize", "QUANT", "--uniform", "4", "--no-eval"],
        ["quantize", "QUANT", "--avg-bits", "4", "--n-calib", "2", "--eval-limit", "1"],
    ],
)
def test_packed_weights_cannot_be_compressed_again(capsys, tmp_path, quant_run, args) -> None:
    """A packed model has no float linears: the sparsity and bit averages divided by zero."""
    args = [quant_run if a == "QUANT" else a for a in args]
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "o")
    error_line(code, err, "without float linear layers", "quantized from")
    assert list(tmp_path.iterdir()) == []
