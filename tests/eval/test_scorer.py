import math

import pytest
import torch
import torch.nn.functional as F

from optlab.core.models import load_model
from optlab.eval.perplexity import perplexity
from optlab.eval.scorer import Scorer, _plan_batches
from optlab.pruning.masks import pruned_linears
from optlab.quant.apply import quantize_rtn_model
from optlab.quant.linear import QuantLinear

TEXT = "It was a bright cold day in April, and the clocks were striking thirteen. " * 3


def _token_logprob(model, context: list[int], token: int) -> float:
    """log P(token | context) from a separate forward pass on the context alone."""
    with torch.no_grad():
        logits = model(torch.tensor([context])).logits[0, -1]
    return F.log_softmax(logits.double(), -1)[token].item()


def _assert_full_forward_scores(lm, tokens, scored) -> None:
    """Each (log-probability, greedy) equals a separate full forward on its own tokens."""
    for (ids, n), (logprob, greedy) in zip(tokens, scored, strict=True):
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids[:-1]])).logits[0, -n:]
        logprobs = F.log_softmax(logits.double(), -1)
        targets = torch.tensor(ids[-n:])
        assert logprob == pytest.approx(logprobs.gather(1, targets[:, None]).sum().item(),
                                        abs=1e-4)  # fmt: skip
        assert greedy == bool((logits.argmax(-1) == targets).all())


@pytest.fixture(params=["llama", "opt", "gpt2"])
def lm(request):
    return load_model(f"tiny:{request.param}")


def test_perplexity_equals_a_token_by_token_computation(lm) -> None:
    scorer = Scorer(lm, batch_size=2, progress=False)
    result = perplexity(scorer, TEXT, seq_len=16, limit=3)
    ids = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    nll, count = 0.0, 0
    for w in range(3):
        window = ids[w * 16 : (w + 1) * 16]
        for t in range(1, 16):
            nll -= _token_logprob(lm.model, window[:t], window[t])
            count += 1
    assert result.tokens == count and result.windows == 3
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_loglikelihood_equals_a_direct_computation(lm) -> None:
    scorer = Scorer(lm, batch_size=3, progress=False)
    requests = [("The clocks were ", "striking"), ("", "April"), ("a bright", " cold day")]
    results = scorer.loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(requests, results, strict=True):
        # lm-eval semantics: the context's trailing space moves to the continuation.
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        ctx = scorer.encode(stripped) if stripped else [scorer.prefix_token_id]
        cont = scorer.encode(continuation)
        expected = sum(_token_logprob(lm.model, ctx + cont[:i], cont[i]) for i in range(len(cont)))
        assert logprob == pytest.approx(expected, abs=1e-4)
        with torch.no_grad():
            logits = lm.model(torch.tensor([ctx + cont])).logits[0]
        argmax = logits[len(ctx) - 1 : -1].argmax(-1).tolist()
        assert greedy == (argmax == cont)


def test_batching_and_padding_do_not_change_scores(lm) -> None:
    requests = [(TEXT[:n], TEXT[n : n + 9]) for n in (5, 17, 40, 61, 2)]
    one = Scorer(lm, batch_size=1, progress=False).loglikelihood(requests)
    many = Scorer(lm, batch_size=5, progress=False).loglikelihood(requests)
    for (a, ga), (b, gb) in zip(one, many, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_rolling_loglikelihood_scores_every_token_in_disjoint_windows(lm) -> None:
    scorer = Scorer(lm, max_length=20, progress=False)
    text = TEXT[:70]
    (total,) = scorer.rolling_loglikelihood([text])
    ids = [scorer.prefix_token_id, *scorer.encode(text)]
    expected = 0.0
    for j in range(1, len(ids)):
        end = min(1 + ((j - 1) // 20 + 1) * 20, len(ids))
        context = ids[max(0, end - 21) : j]  # the window that predicts token j
        expected += _token_logprob(lm.model, context, ids[j])
    assert total == pytest.approx(expected, abs=1e-3)
    # With room for the whole text, it is the log-likelihood of the text after the prefix.
    roomy = Scorer(lm, max_length=200, progress=False)
    (whole,) = roomy.rolling_loglikelihood([text])
    assert whole == pytest.approx(roomy.loglikelihood([("", text)])[0][0], abs=1e-3)
    assert whole != pytest.approx(total, abs=1e-3)  # the short windows lost context


def test_generate_is_greedy_batched_and_stops(lm) -> None:
    scorer = Scorer(lm, batch_size=2, progress=False)
    prompts = ["It was a bright", "The clocks"]
    batched = scorer.generate(prompts, max_new_tokens=6)
    for prompt, text in zip(prompts, batched, strict=True):
        ids = scorer.encode(prompt)
        for _ in range(6):
            with torch.no_grad():
                ids.append(int(lm.model(torch.tensor([ids])).logits[0, -1].argmax()))
        expected = lm.tokenizer.decode(ids[len(scorer.encode(prompt)) :], skip_special_tokens=True)
        assert text == expected
    stop = batched[0][2:4]
    cut = scorer.generate(prompts[:1], max_new_tokens=6, until=[stop])[0]
    assert stop not in cut and batched[0].startswith(cut)


def test_requests_with_the_same_input_share_one_forward(lm) -> None:
    """Two one-token choices after one context are one forward, scored as if run apart."""
    # None ends in a space, and no two begin alike (a shared prefix would run apart).
    contexts = [TEXT[a:b] for a, b in ((0, 10), (11, 34), (40, 80))]
    requests = [(c, choice) for c in contexts for choice in ("x", "y")]
    scorer = Scorer(lm, batch_size=2, progress=False)
    assert all(len(scorer.encode(choice)) == 1 for choice in ("x", "y"))
    rows: list[int] = []
    handle = lm.model.register_forward_hook(lambda _m, args, kw, _o: rows.append(
        kw["input_ids"].shape[0]), with_kwargs=True)  # fmt: skip
    try:
        shared = scorer.loglikelihood(requests)
    finally:
        handle.remove()
    assert sum(rows) == len(contexts)  # one row per distinct input, not per request
    apart = [Scorer(lm, batch_size=1, progress=False).loglikelihood([r])[0] for r in requests]
    for (a, ga), (b, gb) in zip(shared, apart, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_a_quantized_model_dequantizes_once_per_scoring_call() -> None:
    lm = load_model("tiny:llama")
    quantize_rtn_model(lm.model, {n: 4 for n in pruned_linears(lm.model)}, 32)
    layers = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
    calls = []
    for layer in layers:
        layer.codes = lambda layer=layer, codes=layer.codes: calls.append(layer) or codes()
    requests = [(TEXT[:n], TEXT[n : n + 9]) for n in (5, 17, 40, 61, 2)]
    kept = Scorer(lm, batch_size=2, progress=False).loglikelihood(requests)  # 3 batches
    assert len(calls) == len(layers)
    assert all("dequant:torch.float32" not in layer._cache for layer in layers)  # dropped
    for layer in layers:
        layer.kernel = "dequant"
    apart = [Scorer(lm, batch_size=1, progress=False).loglikelihood([r])[0] for r in requests]
    assert len(calls) > 2 * len(layers)  # outside a scoring call: once per forward
    for (a, ga), (b, gb) in zip(kept, apart, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_only_the_scored_positions_reach_the_lm_head(lm) -> None:
    """The head projects the positions that predict scored tokens, no others (padding and
    context positions stay out), and the scores are those of a full forward."""
    requests = [(TEXT[:n], TEXT[n : n + 9]) for n in (5, 17, 40, 61, 2)]
    scorer = Scorer(lm, batch_size=2, progress=False)
    tokens = scorer.continuation_tokens(requests)
    seen: list[int] = []
    head = lm.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, args, _o: seen.append(
        args[0].reshape(-1, args[0].shape[-1]).shape[0]))  # fmt: skip
    try:
        scored = scorer.score_tokens(tokens)
    finally:
        handle.remove()
    assert sum(seen) == sum(n for _, n in tokens)
    _assert_full_forward_scores(lm, tokens, scored)


@pytest.mark.parametrize("family", ["llama", "opt", "opt-350m", "gpt2", "gpt_neox", "qwen2",
                                    "mistral", "gemma3_text"])  # fmt: skip
def test_inputs_with_a_common_prefix_run_it_once(family) -> None:
    """A demonstration before several inputs (retrieval scoring) runs once into a cache that
    each input reads; the scores are those of separate full forwards, on every family (gemma's
    sliding window of 8 lies inside the shared prefix)."""
    lm = load_model(f"tiny:{family}")
    scorer = Scorer(lm, batch_size=4, progress=False)
    demo = TEXT[:60]
    requests = [
        (demo + " \n " + question, answer)
        for question, answer in [
            ("Q: day?", " April"),
            ("Q: clocks?", " striking"),
            ("Q: what?", " bright"),
            ("Q: cold?", " yes"),
            ("Q: when?", " thirteen"),
            ("Q: it?", " a day"),
        ]
    ]
    requests.append(("Unrelated text of its own", " end"))  # shares no prefix: batched apart
    tokens = scorer.continuation_tokens(requests)
    shape: list[tuple[int, ...]] = []
    handle = lm.model.register_forward_hook(lambda _m, args, kw, _o: shape.append(
        tuple(kw["input_ids"].shape)), with_kwargs=True)  # fmt: skip
    try:
        scored = scorer.score_tokens(tokens)
    finally:
        handle.remove()
    prefix = len(scorer.encode(demo))
    # The prefix once, then its inputs' remaining tokens in batches of four and two (both
    # reading the one prefix); the unrelated input alone.
    assert shape[0][0] == 1 and shape[0][1] >= prefix and shape[1][0] == 4
    assert sorted(s[0] for s in shape) == [1, 1, 2, 4]
    assert sum(s[0] * s[1] for s in shape) < sum(len(ids) - 1 for ids, _ in tokens) - 4 * prefix
    _assert_full_forward_scores(lm, tokens, scored)


def test_the_plan_shares_a_prefix_only_where_it_saves_more_than_a_forward_costs() -> None:
    """The batch plan on hand-made token rows (FORWARD_COST_TOKENS = 48, batches of 8)."""
    demo = tuple(range(100, 140))  # 40 tokens
    # Four 2-token inputs after one demonstration, each before four 2-token options: one
    # group of 16 rows at prefix 40 saves more than four groups of 4 at prefix 42.
    rows = [(*demo, q, q, 200 + o, 300) for q in range(4) for o in range(4)]
    plan = _plan_batches(rows, [2] * len(rows), 8)
    assert plan == [(40, sorted(range(16), key=lambda u: -len(rows[u])))]
    # Two rows sharing 10 tokens save 10, less than the extra forward: batched as usual,
    # longest first.
    pair = [tuple(range(10)) + (1,) * 5, tuple(range(10)) + (2,) * 9]
    assert _plan_batches(pair, [1, 1], 8) == [(0, [1, 0])]
    # A shared prefix never covers a scored position: scoring the last 30 of 41 tokens
    # leaves 11 to share.
    scored_late = [(*demo, q) for q in range(16)]
    [(prefix, group)] = _plan_batches(scored_late, [30] * 16, 8)
    assert prefix == 11 and sorted(group) == list(range(16))
