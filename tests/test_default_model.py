"""End-to-end checks on the real default model (SmolLM2-135M); about two minutes on 2 cores."""

import json

import pytest

from optlab.api import evaluate
from optlab.cli import main
from optlab.eval.scorer import Scorer

pytestmark = pytest.mark.slow


def test_default_model_perplexity_on_wiki_is_sane(default_lm) -> None:
    result = evaluate(default_lm, ["ppl:wiki"], seq_len=512, limit=16, progress=False)
    ppl = result["tasks"]["ppl:wiki"]["perplexity"]
    print(f"default model ppl:wiki (16 x 512 tokens) = {ppl:.2f}")
    assert 5 < ppl < 40


def test_default_model_knows_capitals(default_lm) -> None:
    scorer = Scorer(default_lm, progress=False)
    (completion,) = scorer.generate(["The capital of France is"], max_new_tokens=5)
    assert "Paris" in completion
    (paris, greedy), (rome, _) = scorer.loglikelihood(
        [("The capital of France is", " Paris"), ("The capital of France is", " Rome")]
    )
    assert paris > rome and greedy


def test_demo_writes_a_readable_run(capsys, tmp_path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--limit", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["run"] == str(out)
    report = (out / "report.md").read_text()
    assert "perplexity" in report and "Paris" in report and "Wanda 50%" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dense"]["ppl:wiki"]["windows"] == 2
    assert 0.5 < metrics["dense"]["mc:sentiment"]["acc"] <= 1
    assert metrics["prune"]["sparsity"] == 0.5
    # Pruning half the weights costs perplexity, but the model stays a language model.
    dense, pruned = metrics["dense"]["ppl:wiki"], metrics["wanda50"]["ppl:wiki"]
    assert dense["perplexity"] < pruned["perplexity"] < 10 * dense["perplexity"]
    # The quantized copy honours its 4.5-bit budget and loses less than pruning half of it.
    quantized = metrics["tdmpq45"]["ppl:wiki"]
    assert metrics["quantize"]["avg_bits"] <= 4.5
    assert sum(metrics["quantize"]["layers_per_width"].values()) == 30
    assert len(json.loads((out / "bits.json").read_text())) == 30
    assert dense["perplexity"] < quantized["perplexity"] < pruned["perplexity"]
    assert "TDMPQ 4.5 bits" in report
