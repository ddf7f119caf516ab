"""End-to-end checks on the real default model (SmolLM2-135M); about two minutes on 2 cores."""

import json

import pytest

from optlab.api import evaluate
from optlab.cli import main
from optlab.eval.scorer import Scorer
from optlab.retrieve.scoring import answer_metric, generation_answers
from optlab.retrieve.tasks import shipped_tasks

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


def test_default_model_answers_the_shipped_capital_questions(default_lm) -> None:
    # UPRISE's closed-book QA: after a bare "Answer:" this instruct model ended its turn at
    # once, so every method scored 0; the template's lead-in must give real answers.
    examples = shipped_tasks()["country_capital"].examples[40:56]
    answers = generation_answers(Scorer(default_lm, progress=False), [e.input for e in
                                 examples], max_new_tokens=8)  # fmt: skip
    assert all(a.strip() for a in answers), answers
    right = [answer_metric(a, e.target, e.metric) for a, e in zip(answers, examples, strict=True)]
    assert sum(right) >= 4, answers


def test_demo_writes_a_readable_run(capsys, tmp_path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--limit", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["run"] == str(out)
    report = (out / "report.md").read_text()
    assert "perplexity" in report and "Paris" in report and "wanda50-eval" in report
    assert "data:image/png;base64," in (out / "report.html").read_text()

    def tasks(step):
        return json.loads((out / step / "metrics.json").read_text())["tasks"]

    dense, pruned, quantized = tasks("dense"), tasks("wanda50-eval"), tasks("tdmpq45-eval")
    assert dense["ppl:wiki"]["windows"] == 2
    assert 0.5 < dense["mc:sentiment"]["acc"] <= 1 and dense["mc:sentiment"]["n"] == 100
    assert json.loads((out / "wanda50" / "metrics.json").read_text())["sparsity"]["total"] == 0.5
    # Pruning half the weights costs perplexity, but the model stays a language model.
    dense_ppl, pruned_ppl = dense["ppl:wiki"]["perplexity"], pruned["ppl:wiki"]["perplexity"]
    assert dense_ppl < pruned_ppl < 10 * dense_ppl
    # The quantized copy honours its 4.5-bit budget and loses less than pruning half of it.
    quantize = json.loads((out / "tdmpq45" / "metrics.json").read_text())
    assert quantize["avg_bits"] <= 4.5
    assert len(quantize["bits_per_unit"]) == 30
    assert len(json.loads((out / "tdmpq45" / "bits.json").read_text())["units"]) == 30
    assert dense_ppl < quantized["ppl:wiki"]["perplexity"] < pruned_ppl
    assert "tdmpq45" in report
