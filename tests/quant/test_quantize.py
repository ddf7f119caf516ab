"""The quantize pipeline and ``optlab quantize``: budgets, run contents, honest sizes."""

import json

import pytest
import torch

from optlab.api import quantize
from optlab.cli import main
from optlab.core.calibration import Calibration
from optlab.core.models import load_model
from optlab.errors import OptlabError
from optlab.quant.linear import QuantLinear
from optlab.quant.quantize import (
    AvgBitsConfig,
    CMPQConfig,
    GPTQConfig,
    MaxSizeConfig,
    PMPQConfig,
    RTNConfig,
    StorageConfig,
    TDMPQConfig,
    UniformConfig,
)
from tests.conftest import random_ids

TEXT = " ".join(f"sentence {i} about quantizing small language models." for i in range(200))


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return str(path)


def _run(lm, calib: str, allocation, out, *, sensitivity=None, gptq=False, embed_bits=None):
    """quantize() on 8 x 32 tokens of ``calib`` with groups of 32, no perplexity."""
    grid = GPTQConfig(group_size=32) if gptq else RTNConfig(group_size=32)
    return quantize(lm, allocation, sensitivity=sensitivity, quantizer=grid,
                    storage=StorageConfig(embed_bits=embed_bits),
                    calib=Calibration(corpus=calib, n=8, seq_len=32, batch_size=4), out=out,
                    progress=False)  # fmt: skip


def test_avg_bits_run_is_honest_and_reloads(tmp_path, calib) -> None:
    lm = load_model("tiny:llama")
    result = _run(lm, calib, AvgBitsConfig(avg_bits=5.0, widths="16,8,4,3"), tmp_path / "run",
                  sensitivity=TDMPQConfig(), gptq=True)  # fmt: skip
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["avg_bits"] <= 5.0
    file_bytes = (run / "model" / "model.safetensors").stat().st_size
    assert metrics["file_bytes"] == file_bytes
    assert metrics["compression_vs_fp16"] == pytest.approx(metrics["fp16_bytes"] / file_bytes)
    assert metrics["effective_bits"] > metrics["avg_bits"]  # scales and zeros are counted
    bits = json.loads((run / "bits.json").read_text())
    scores = json.loads((run / "sensitivity.json").read_text())
    assert set(scores["scores"]) == set(bits["units"]) == set(metrics["bits_per_unit"])
    assert (run / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    reloaded = load_model(str(run))
    for name, width in bits["linears"].items():
        module = reloaded.model.get_submodule(name)
        assert (module.bits if isinstance(module, QuantLinear) else 16) == width
    ids = random_ids(2, 16)
    assert torch.equal(reloaded.model(ids).logits, lm.model(ids).logits)
    assert result["run"] == str(run)


def test_max_size_is_honoured_in_real_bytes_and_impossible_sizes_refused(tmp_path, calib) -> None:
    lm = load_model("tiny:gpt2")
    metrics = _run(lm, calib, MaxSizeConfig(max_size_mb=0.12, widths="16,8,4,2"),
                   tmp_path / "run", sensitivity=PMPQConfig())  # fmt: skip
    assert metrics["file_bytes"] <= 0.12e6
    # Packing the (tied) embedding table too leaves room for more bits in the blocks.
    smaller = _run(load_model("tiny:gpt2"), calib, MaxSizeConfig(max_size_mb=0.1, widths="8,4,2"),
                   tmp_path / "e", sensitivity=PMPQConfig(), embed_bits=4)  # fmt: skip
    assert smaller["file_bytes"] <= 0.1e6 and smaller["embeddings"]["tied"]
    with pytest.raises(OptlabError, match="max-size"):
        _run(load_model("tiny:gpt2"), calib, MaxSizeConfig(max_size_mb=0.01), tmp_path / "small",
             sensitivity=PMPQConfig())  # fmt: skip
    assert not (tmp_path / "small").exists()


def test_config_errors_are_clear(capsys) -> None:
    # one allocation rule at a time, checked from the flags before anything is loaded
    assert main(["quantize", "tiny:opt", "--avg-bits", "4", "--uniform", "4", "--out", "x"]) == 2
    assert "give exactly one of --avg-bits, --max-size, --tiers, --uniform" in \
        capsys.readouterr().err  # fmt: skip
    assert main(["quantize", "tiny:opt", "--sensitivity", "cmqp", "--avg-bits", "4",
                 "--out", "x"]) == 2  # fmt: skip
    assert "Did you mean 'cmpq'" in capsys.readouterr().err
    with pytest.raises(OptlabError, match="layers only"):
        CMPQConfig(per_linear=True)
    with pytest.raises(OptlabError, match="cca_dims must be a whole number >= 0, got -1"):
        CMPQConfig(cca_dims=-1)
    with pytest.raises(OptlabError, match="avg_bits must be a finite number, got nan"):
        AvgBitsConfig(avg_bits=float("nan"))
    with pytest.raises(OptlabError, match="--scores-from reuses sensitivities"):
        quantize(load_model("tiny:opt"), UniformConfig(uniform=4),
                 sensitivity=TDMPQConfig(scores_from="runs/x"))  # fmt: skip


def test_cli_quantize_tiers_json_and_errors(tmp_path, calib, capsys) -> None:
    out = tmp_path / "run"
    args = ["quantize", "tiny:opt", "--sensitivity", "cmpq", "--tiers", "16,8,4", "--calib",
            calib, "--n-calib", "8", "--seq-len", "32", "--group-size", "32",
            "--eval-limit", "1", "--eval-seq-len", "32", "--out", str(out)]  # fmt: skip
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["bits_per_unit"].values()) <= {16, 8, 4}
    assert result["perplexity_after"]["perplexity"] > 0 < result["perplexity_before"]["nll"]
    assert main(args) == 2 and "exists; pass --force" in capsys.readouterr().err
    bad = ["quantize", "tiny:opt", "--avg-bits", "3", "--calib", calib, "--n-calib", "8",
           "--seq-len", "32", "--no-eval", "--out", str(tmp_path / "bad")]  # fmt: skip
    assert main(bad) == 2
    assert "budget impossible" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    given_to_another = [*bad[:-1], str(tmp_path / "bad"), "--cca-dims", "4"]
    assert main(given_to_another) == 2
    assert "--cca-dims is an option of cmpq, not of tdmpq" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_default_model_at_4_bits_is_3_5x_smaller_than_fp16_and_reloads(tmp_path) -> None:
    """The issue's size goal in real bytes: 4-bit block linears and embeddings, no eval."""
    lm = load_model("default")
    metrics = quantize(lm, UniformConfig(uniform=4), quantizer=RTNConfig(group_size=64),
                       storage=StorageConfig(embed_bits=4), out=tmp_path / "run",
                       progress=False)  # fmt: skip
    assert metrics["avg_bits"] == 4
    assert metrics["compression_vs_fp16"] >= 3.5
    assert metrics["kernels"] == {"tinygemm": 210, "matvec": 1}  # block linears; the tied head
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    reloaded = load_model(str(tmp_path / "run"))
    assert torch.equal(reloaded.model(ids).logits, lm.model(ids).logits)


def test_scores_are_reused_only_when_scored_the_same_way(tmp_path, calib, monkeypatch) -> None:
    first = _run(load_model("tiny:llama"), calib, AvgBitsConfig(avg_bits=6.0, widths="8,4"),
                 tmp_path / "a")  # fmt: skip
    # Reuse must not score again: any call to the scorer fails the test.
    monkeypatch.setattr("optlab.quant.quantize.sensitivities", lambda *a, **k: 1 / 0)
    reuse = TDMPQConfig(scores_from=str(tmp_path / "a"))
    second = _run(load_model("tiny:llama"), calib, AvgBitsConfig(avg_bits=6.0, widths="8,4"),
                  tmp_path / "b", sensitivity=reuse)  # fmt: skip
    scored, reused = (json.loads((tmp_path / r / "sensitivity.json").read_text()) for r in "ab")
    assert reused["scores"] == scored["scores"]
    assert second["bits_per_unit"] == first["bits_per_unit"]
    lower = _run(load_model("tiny:llama"), calib, AvgBitsConfig(avg_bits=5.0, widths="8,4"),
                 tmp_path / "c", sensitivity=reuse)  # fmt: skip
    assert lower["avg_bits"] <= 5.0
    with pytest.raises(OptlabError, match="error_bits: 4 there, 3 here"):
        _run(load_model("tiny:llama"), calib, AvgBitsConfig(avg_bits=6.0, widths="8,3"),
             tmp_path / "d", sensitivity=reuse)  # fmt: skip
    with pytest.raises(OptlabError, match="model: 'tiny:llama' there, 'tiny:opt' here"):
        _run(load_model("tiny:opt"), calib, AvgBitsConfig(avg_bits=6.0, widths="8,4"),
             tmp_path / "e", sensitivity=reuse)  # fmt: skip
    with pytest.raises(OptlabError, match="no sensitivities"):
        _run(
            load_model("tiny:llama"),
            calib,
            AvgBitsConfig(avg_bits=6.0),
            tmp_path / "f",
            sensitivity=TDMPQConfig(scores_from=str(tmp_path / "missing")),
        )
