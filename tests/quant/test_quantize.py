"""The quantize pipeline and ``optlab quantize``: budgets, run contents, honest sizes."""

import json

import pytest
import torch

from optlab.cli import main
from optlab.core.models import load_model
from optlab.errors import OptlabError
from optlab.quant.linear import QuantLinear
from optlab.quant.quantize import QuantConfig, quantize_to_run
from tests.conftest import random_ids

TEXT = " ".join(f"sentence {i} about quantizing small language models." for i in range(200))


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return str(path)


def _config(calib: str, **kwargs) -> QuantConfig:
    return QuantConfig(calib=calib, n_calib=8, seq_len=32, batch_size=4, group_size=32, **kwargs)


def test_avg_bits_run_is_honest_and_reloads(tmp_path, calib) -> None:
    lm = load_model("tiny:llama")
    config = _config(calib, sensitivity="tdmpq", avg_bits=5.0, widths="16,8,4,3", gptq=True)
    result = quantize_to_run(lm, config, tmp_path / "run", evaluate=False, progress=False)
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
    config = _config(calib, sensitivity="pmpq", max_size_mb=0.12, widths="16,8,4,2")
    metrics = quantize_to_run(lm, config, tmp_path / "run", evaluate=False, progress=False)
    assert metrics["file_bytes"] <= 0.12e6
    # Packing the (tied) embedding table too leaves room for more bits in the blocks.
    packed = _config(calib, sensitivity="pmpq", max_size_mb=0.1, widths="8,4,2", embed_bits=4)
    smaller = quantize_to_run(load_model("tiny:gpt2"), packed, tmp_path / "e", evaluate=False)
    assert smaller["file_bytes"] <= 0.1e6 and smaller["embeddings"]["tied"]
    too_small = _config(calib, sensitivity="pmpq", max_size_mb=0.01)
    with pytest.raises(OptlabError, match="max-size"):
        quantize_to_run(load_model("tiny:gpt2"), too_small, tmp_path / "small", evaluate=False)
    assert not (tmp_path / "small").exists()


def test_config_errors_are_clear() -> None:
    with pytest.raises(OptlabError, match="exactly one"):
        QuantConfig(avg_bits=4, uniform=4).validate()
    with pytest.raises(OptlabError, match="Did you mean 'cmpq'"):
        QuantConfig(sensitivity="cmqp", avg_bits=4).validate()
    with pytest.raises(OptlabError, match="layers only"):
        QuantConfig(sensitivity="cmpq", avg_bits=4, granularity="linear").validate()


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


@pytest.mark.slow
def test_default_model_at_4_bits_is_3_5x_smaller_than_fp16_and_reloads(tmp_path) -> None:
    """The issue's size goal in real bytes: 4-bit block linears and embeddings, no eval."""
    lm = load_model("default")
    config = QuantConfig(uniform=4, embed_bits=4, group_size=64)
    metrics = quantize_to_run(lm, config, tmp_path / "run", evaluate=False, progress=False)
    assert metrics["avg_bits"] == 4
    assert metrics["compression_vs_fp16"] >= 3.5
    assert metrics["kernels"] == {"int4pack": 211}  # 210 block linears + the tied head
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    reloaded = load_model(str(tmp_path / "run"))
    assert torch.equal(reloaded.model(ids).logits, lm.model(ids).logits)


def test_scores_are_reused_only_when_scored_the_same_way(tmp_path, calib, monkeypatch) -> None:
    first = quantize_to_run(load_model("tiny:llama"), _config(calib, avg_bits=6.0, widths="8,4"),
                            tmp_path / "a", evaluate=False, progress=False)  # fmt: skip
    # Reuse must not score again: any call to the scorer fails the test.
    monkeypatch.setattr("optlab.quant.quantize.sensitivities", lambda *a, **k: 1 / 0)
    again = _config(calib, avg_bits=6.0, widths="8,4", scores_from=str(tmp_path / "a"))
    second = quantize_to_run(load_model("tiny:llama"), again, tmp_path / "b", evaluate=False)
    scored, reused = (json.loads((tmp_path / r / "sensitivity.json").read_text()) for r in "ab")
    assert reused["scores"] == scored["scores"]
    assert second["bits_per_unit"] == first["bits_per_unit"]
    lower = _config(calib, avg_bits=5.0, widths="8,4", scores_from=str(tmp_path / "a"))
    assert quantize_to_run(load_model("tiny:llama"), lower, tmp_path / "c",
                           evaluate=False)["avg_bits"] <= 5.0  # fmt: skip
    other = _config(calib, avg_bits=6.0, widths="8,3", scores_from=str(tmp_path / "a"))
    with pytest.raises(OptlabError, match="error_bits: 4 there, 3 here"):
        quantize_to_run(load_model("tiny:llama"), other, tmp_path / "d", evaluate=False)
    with pytest.raises(OptlabError, match="model: 'tiny:llama' there, 'tiny:opt' here"):
        quantize_to_run(load_model("tiny:opt"), again, tmp_path / "e", evaluate=False)
    with pytest.raises(OptlabError, match="no sensitivities"):
        bad = _config(calib, avg_bits=6.0, scores_from=str(tmp_path / "missing"))
        quantize_to_run(load_model("tiny:llama"), bad, tmp_path / "f", evaluate=False)
