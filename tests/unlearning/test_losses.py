"""Each loss against a direct computation: one unpadded forward per example, answer tokens
picked by hand from the rendered text."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from optlab.core.models import load_model
from optlab.errors import OptlabError
from optlab.unlearning.data import IGNORE, Example, encode, load_examples
from optlab.unlearning.losses import LOSSES, LossInputs, answer_ce, retain_kl

FORGET = [Example("Paris", "What is the capital of France?"), Example("Rome", "Capital of Italy?")]
RETAIN = [Example("Berlin and more", "What is the capital of Germany?"), Example("Oslo", "Norway?")]


@pytest.fixture
def lm():
    return load_model("tiny:llama", seed=0)


def direct_answer_logprobs(lm, example: Example) -> list[float]:
    """Log-probs of the answer tokens, from a forward over that example alone."""
    tok = lm.tokenizer
    prompt = tok(example.prompt, add_special_tokens=False)["input_ids"]
    answer = tok(" " + example.answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), -1)
    return [logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(answer)]


def direct_ce(lm, examples) -> float:
    """Mean over examples of each answer's mean token cross-entropy."""
    per_example = [direct_answer_logprobs(lm, e) for e in examples]
    return -sum(sum(v) / len(v) for v in per_example) / len(per_example)


def test_labels_cover_exactly_the_answer_tokens_whatever_the_pad_id(lm) -> None:
    tok = lm.tokenizer
    batch = encode(tok, FORGET)
    for row, example in enumerate(FORGET):
        answer = tok(" " + example.answer, add_special_tokens=False)["input_ids"]
        labels = batch.labels[row][batch.labels[row] != IGNORE].tolist()
        assert labels == answer
        assert int(batch.attention_mask[row].sum()) == len(
            tok(example.prompt, add_special_tokens=False)["input_ids"]
        ) + len(answer)
    tok.pad_token_id = 7  # no pad id is assumed anywhere
    assert torch.equal(encode(tok, FORGET).labels, batch.labels)


def test_documents_are_scored_whole_after_a_prefix_token(lm) -> None:
    batch = encode(lm.tokenizer, [Example("abc def")])
    assert batch.input_ids[0, 0].item() == lm.tokenizer.bos_token_id
    assert batch.labels[0, 0].item() == IGNORE
    assert (batch.labels[0, 1:] != IGNORE).all()


def test_answer_ce_matches_direct_computation_with_padding(lm) -> None:
    mixed = [*FORGET, *RETAIN]  # different lengths: the short ones are padded
    assert answer_ce(lm.model, encode(lm.tokenizer, mixed)).item() == pytest.approx(
        direct_ce(lm, mixed), rel=1e-5
    )


def test_signs_and_parts_of_each_loss(lm) -> None:
    tok, model = lm.tokenizer, lm.model
    forget, retain = encode(tok, FORGET), encode(tok, RETAIN)
    f_ce, r_ce = direct_ce(lm, FORGET), direct_ce(lm, RETAIN)
    reference = copy.deepcopy(model)
    x = LossInputs(model, forget, retain, reference=reference)
    assert LOSSES.get("ga")(x)[0].item() == pytest.approx(-f_ce, rel=1e-5)
    assert LOSSES.get("graddiff")(x)[0].item() == pytest.approx(r_ce - f_ce, rel=1e-5)
    assert LOSSES.get("retain_only")(x)[0].item() == pytest.approx(r_ce, rel=1e-5)
    # NPO against an identical reference: -2/beta log sigmoid(0) = 2 log 2 / beta.
    for beta in (1.0, 0.5):
        x.beta = beta
        loss, parts = LOSSES.get("npo")(x)
        assert parts["npo"] == pytest.approx(2 * math.log(2) / beta, rel=1e-5)
        assert loss.item() == pytest.approx(2 * math.log(2) / beta + r_ce, rel=1e-5)
    x.beta, x.retain_weight = 1.0, 3.0  # alpha weighs the retain term only
    assert LOSSES.get("graddiff")(x)[0].item() == pytest.approx(3 * r_ce - f_ce, rel=1e-5)
    assert LOSSES.get("npo")(x)[0].item() == pytest.approx(2 * math.log(2) + 3 * r_ce, rel=1e-5)


def test_npo_matches_its_formula_against_a_different_reference(lm) -> None:
    reference = copy.deepcopy(lm.model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    beta = 1.0
    x = LossInputs(
        lm.model,
        encode(lm.tokenizer, FORGET),
        encode(lm.tokenizer, RETAIN),
        reference=reference,
        beta=beta,
    )
    ref_lm = type(lm)(reference, lm.tokenizer, "ref")
    terms = []
    for e in FORGET:
        ratio = sum(direct_answer_logprobs(lm, e)) - sum(direct_answer_logprobs(ref_lm, e))
        terms.append(-2 / beta * torch.nn.functional.logsigmoid(torch.tensor(-beta * ratio)).item())
    assert LOSSES.get("npo")(x)[1]["npo"] == pytest.approx(sum(terms) / len(terms), rel=1e-4)


def test_kl_is_zero_for_identical_models_and_positive_otherwise(lm) -> None:
    batch = encode(lm.tokenizer, RETAIN)
    same = copy.deepcopy(lm.model)
    assert retain_kl(lm.model, same, batch).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        next(same.parameters()).add_(0.1)
    assert retain_kl(lm.model, same, batch).item() > 1e-4


def test_kl_ignores_padding_positions(lm) -> None:
    other = copy.deepcopy(lm.model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tok = lm.tokenizer
    short = [RETAIN[1]]
    alone = retain_kl(lm.model, other, encode(tok, short)).item()
    padded = encode(tok, [RETAIN[1], RETAIN[0]])  # RETAIN[1] is padded in this batch
    cur = torch.log_softmax(lm.model(**padded.inputs()).logits.float(), -1)
    ref = torch.log_softmax(other(**padded.inputs()).logits.float(), -1)
    per_position = (ref.exp() * (ref - cur)).sum(-1)
    n = int(padded.attention_mask[0].sum())
    assert per_position[0, :n].mean().item() == pytest.approx(alone, rel=1e-4)


def test_random_answer_loss_skips_the_question(lm) -> None:
    """The reference code's bug: its random-answer loss also trained on the question."""
    random_pairs = [Example(r.answer, f.question) for f in FORGET for r in RETAIN]
    x = LossInputs(
        lm.model,
        encode(lm.tokenizer, FORGET),
        encode(lm.tokenizer, RETAIN),
        random=encode(lm.tokenizer, random_pairs),
        reference=copy.deepcopy(lm.model),
    )
    loss, parts = LOSSES.get("ga_kl_rand")(x)
    assert parts["random_ce"] == pytest.approx(direct_ce(lm, random_pairs), rel=1e-5)
    assert parts["kl"] == pytest.approx(0.0, abs=1e-6)
    expected = -0.5 * direct_ce(lm, FORGET) + direct_ce(lm, random_pairs)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_load_examples_formats_and_errors(tmp_path) -> None:
    qa = tmp_path / "f.jsonl"
    qa.write_text('{"question": "Q1?", "answer": "A1"}\n\n{"text": "a document"}\n')
    assert load_examples(qa) == [Example("A1", "Q1?"), Example("a document")]
    docs = tmp_path / "d.txt"
    docs.write_text("first doc\nline two\n\n\nsecond doc\n")
    assert [e.answer for e in load_examples(docs)] == ["first doc\nline two", "second doc"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?"}\n')
    with pytest.raises(OptlabError, match=r"bad\.jsonl:1"):
        load_examples(bad)
    with pytest.raises(OptlabError, match="not found"):
        load_examples(tmp_path / "missing.jsonl")
    assert Example("A1", "Q1?").text == "### Question: Q1?\n ### Answer: A1"
