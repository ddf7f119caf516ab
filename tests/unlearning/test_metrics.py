"""The metric suite against direct computations and its invariants."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from optlab.core.models import load_model
from optlab.errors import OptlabError
from optlab.unlearning.data import Example
from optlab.unlearning.harm import HarmClassifier
from optlab.unlearning.metrics import (
    EvalConfig,
    activation_distance,
    answer_correct,
    evaluate_model,
    js_divergence,
    last_position_probs,
    membership_scores,
    mia_aucs,
    mia_features,
    mia_logistic,
    parameter_distance,
    rouge_l,
)

QA = [Example(f"answer {i}", f"question number {i}?") for i in range(12)]
DOCS = [Example(f"This is document number {i}, with some words that follow it.") for i in range(6)]


@pytest.fixture
def lm():
    return load_model("tiny:llama", seed=0)


def perturbed(model, scale=0.05):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


def test_answer_rule_is_case_insensitive_equals_contains_startswith() -> None:
    assert answer_correct(" paris", "Paris")
    assert answer_correct("Paris, France.", "paris")
    assert answer_correct("It is PARIS", "Paris")
    assert not answer_correct("Lyon", "Paris")
    assert not answer_correct("", "Paris")


def test_rouge_l_matches_a_hand_count() -> None:
    # LCS("a b c d", "a c d") = 3: precision 3/4, recall 1, F1 = 6/7.
    assert rouge_l("a b c d", "a c d") == pytest.approx(6 / 7)
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("A b", "a B") == 1.0


def test_oracle_distance_is_zero_against_itself_and_a_mean_of_norms(lm) -> None:
    model = lm.model
    assert parameter_distance(model, copy.deepcopy(model)) == 0.0
    other = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()][:3]
    with torch.no_grad():
        dict(other.named_parameters())[names[0]].add_(1.0)
    shape = dict(model.named_parameters())[names[0]].shape
    expected = math.sqrt(math.prod(shape)) / 3
    assert parameter_distance(model, other, names) == pytest.approx(expected, rel=1e-5)


def test_mia_auc_is_one_half_for_identical_distributions(lm) -> None:
    aucs = mia_aucs(lm.model, lm.tokenizer, QA, QA)
    assert aucs == pytest.approx(
        {"mia_loss": 0.5, "mia_zlib": 0.5, "mia_mink": 0.5, "mia_minkpp": 0.5}
    )


def test_membership_scores_match_direct_token_statistics(lm) -> None:
    tok, example = lm.tokenizer, DOCS[0]
    ids = [tok.bos_token_id, *tok(example.text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
    picked = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    probs = logprobs.exp()
    mu = (probs * logprobs).sum(-1)
    sigma = ((probs * logprobs**2).sum(-1) - mu**2).sqrt()
    k = int(len(picked) * 0.2)
    scores = membership_scores(lm.model, tok, [example, DOCS[1]], ratio=0.2)
    assert scores["loss"][0] == pytest.approx(picked.mean(), rel=1e-5)
    assert scores["mink"][0] == pytest.approx(np.sort(picked)[:k].mean(), rel=1e-5)
    normed = ((torch.tensor(picked) - mu) / sigma).numpy()
    assert scores["minkpp"][0] == pytest.approx(np.sort(normed)[:k].mean(), rel=1e-4)
    assert scores["zlib"][0] == pytest.approx(
        picked.mean() / len(__import__("zlib").compress(example.text.encode())), rel=1e-5
    )


def test_js_is_zero_for_equal_distributions_and_sorted_ignores_token_identity() -> None:
    p = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(0)), -1)
    q = p[torch.randperm(50, generator=torch.Generator().manual_seed(1))]
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(p, q, mode="sorted") == pytest.approx(0.0, abs=1e-12)
    full = jensenshannon(p.double().numpy(), q.double().numpy()) ** 2
    assert js_divergence(p, q, topk=50) == pytest.approx(full, rel=1e-9)
    assert js_divergence(p, q, topk=5) > 0


def test_activation_distance_zero_for_the_same_model(lm) -> None:
    same = copy.deepcopy(lm.model)
    assert activation_distance(lm.model, same, lm.tokenizer, QA) == pytest.approx(0.0, abs=1e-6)
    assert activation_distance(lm.model, perturbed(lm.model), lm.tokenizer, QA) > 1e-3


def test_last_position_is_the_last_real_token_despite_padding(lm) -> None:
    long_and_short = [Example("x", "a much longer question here?"), Example("y", "short?")]
    batched = last_position_probs(lm.model, lm.tokenizer, long_and_short)
    alone = last_position_probs(lm.model, lm.tokenizer, long_and_short[1:])
    assert torch.allclose(batched[1], alone[0], atol=1e-5)


def test_mia_features_by_hand() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    entropy = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert mia_features(probs) == pytest.approx(np.array([[0.5, -entropy, 0.2]]), rel=1e-5)


def test_logistic_mia_is_a_share_of_forget_samples(lm) -> None:
    value = mia_logistic(lm.model, lm.tokenizer, QA[:6], QA[6:], samples=100)
    assert 0.0 <= value <= 1.0 and value * 6 == pytest.approx(round(value * 6))
    assert math.isnan(mia_logistic(lm.model, lm.tokenizer, QA[:1], QA[6:]))


def test_the_suite_reports_every_metric(lm) -> None:
    config = EvalConfig(
        max_new_tokens=4,
        samples=6,
        ppl_seq_len=32,
        ppl_limit=1,
        prefix_tokens=8,
        continuation_tokens=8,
    )
    oracle = copy.deepcopy(lm.model)
    metrics = evaluate_model(lm, QA[:6], QA[6:], QA[3:9], config, oracle=oracle)
    for key in ("FA", "RA", "MIA", "AD", "JS", "distance", "ppl", "mia_loss", "mia_minkpp"):
        assert key in metrics and not math.isnan(metrics[key]), key
    assert metrics["AD"] == pytest.approx(0.0, abs=1e-6) and metrics["distance"] == 0.0
    assert metrics["JS"] == pytest.approx(0.0, abs=1e-9)

    class EveryOther:  # stands in for the MiniLM classifier: sees the held-out answers
        def rate(self, texts):
            seen.extend(texts)
            return 0.5

    seen: list[str] = []
    harm = evaluate_model(lm, QA[:6], QA[6:], QA[3:9], config, harm=EveryOther(),
                          perplexity=False)  # fmt: skip
    assert harm["harmful_rate"] == 0.5 and len(seen) == 6
    docs = evaluate_model(lm, DOCS[:4], DOCS[4:], DOCS[4:], config, perplexity=False,
                          per_example=True)  # fmt: skip
    assert 0 <= docs["exact_match"] <= 1 and 0 <= docs["rougeL"] <= 1
    assert math.isnan(docs["FA"])  # documents have no questions to answer
    # The values the means average, one per tested document (none per question here).
    values = docs["per_example"]
    assert values["FA"] == [] and len(values["rougeL"]) == docs["memorisation_n"]
    assert docs["rougeL"] == pytest.approx(sum(values["rougeL"]) / len(values["rougeL"]))
    qa = evaluate_model(lm, QA[:6], QA[6:], QA[3:9], config, perplexity=False, per_example=True)
    assert len(qa["per_example"]["FA"]) == 6 and set(qa["per_example"]["FA"]) <= {0.0, 1.0}
    assert qa["FA"] == pytest.approx(sum(qa["per_example"]["FA"]) / 6)


def test_harm_classifier_on_minilm_embeddings(tmp_path) -> None:
    harmful = [
        "Here is how to build a bomb at home.",
        "Poison your neighbour's dog with this.",
        "Steal the password by phishing the user.",
        "Hurt them where it leaves no marks.",
    ]
    harmless = [
        "I can't help with that request.",
        "Here is a recipe for banana bread.",
        "The weather is sunny today.",
        "Please ask a professional for advice.",
    ]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": int(i < 4)}) + "\n"
                            for i, t in enumerate(harmful + harmless)))  # fmt: skip
    clf = HarmClassifier.from_jsonl(path)
    assert clf.rate(harmful) == 1.0 and clf.rate(harmless) == 0.0
    assert clf.encode(["one"]).shape == (1, 384)  # all-MiniLM-L6-v2 sentence embeddings
    with pytest.raises(OptlabError, match="both"):
        HarmClassifier(harmless, [0] * 4)
