"""Generation with per-token exits over a KV cache, and exact self-speculation, on tiny models
of every family, against transformers' greedy ``generate`` and direct (uncached) references."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from optlab.core.anatomy import Anatomy
from optlab.core.models import TINY_SHAPES, LoadedModel, byte_tokenizer
from optlab.early_exit.decode import LayerStack, generate, speculate
from optlab.early_exit.rules import ConfidenceExit, ExitHead, FixedExit, NoExit, exit_rule
from optlab.errors import OptlabError

FAMILIES = sorted(TINY_SHAPES)
LAYERS = 4
PROMPTS = {1: "d", 5: "def f", 19: "def add(a, b): ret"}  # longer than gemma's window of 8


def deep(family: str) -> LoadedModel:
    """The tiny model of ``family`` with 4 blocks (three exits below the last, E in 1..3)."""
    model_type, kwargs = TINY_SHAPES[family]
    kwargs = dict(kwargs)
    kwargs["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = LAYERS
    if "layer_types" in kwargs:
        kwargs["layer_types"] = kwargs["layer_types"] * (LAYERS // len(kwargs["layer_types"]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model.eval(), tokenizer, f"tiny4:{family}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Blocks of a 64-wide model are too small for threads: on shared cores one is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request: pytest.FixtureRequest) -> LoadedModel:
    return deep(request.param)


def ids_of(lm: LoadedModel, text: str) -> list[int]:
    return lm.tokenizer(text).input_ids


def greedy(lm: LoadedModel, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy decoding (with its cache)."""
    out = lm.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                            dtype=torch.long), do_sample=False, max_new_tokens=n)  # fmt: skip
    return out[0, len(ids) :].tolist()


class SignRule:
    """A deterministic rule that varies from token to token: exit where the state's first
    coordinate is above ``bar`` times its mean size (tiny random models are never confident,
    so a confidence rule would not exit; post-norm states have mean 0, so not the mean)."""

    def __init__(self, bar: float) -> None:
        self.bar = bar

    def should_exit(self, layer: int, hidden: torch.Tensor) -> bool:
        return bool(hidden[0] > self.bar * hidden.abs().mean())


def uncached(lm: LoadedModel, ids: list[int], rule, exits, n: int) -> tuple[list[int], list[int]]:
    """The official evaluation's way: every step runs the whole sequence through the full
    model (no cache) and the last token exits where ``rule`` says, reading HF's
    ``hidden_states[l]`` (pre-norm below the last layer) through the model's own head."""
    anatomy = Anatomy.of(lm.model)
    tokens, layers = [], []
    seq = list(ids)
    for _ in range(n):
        with torch.no_grad():
            out = lm.model(torch.tensor([seq]), output_hidden_states=True, use_cache=False)
        layer = next((e for e in exits[:-1] if rule.should_exit(e, out.hidden_states[e][0, -1])),
                     LAYERS)  # fmt: skip
        logits = out.logits[0, -1] if layer == LAYERS else anatomy.logits(
            out.hidden_states[layer][0, -1])  # fmt: skip
        tokens.append(int(logits.argmax()))
        layers.append(layer)
        seq.append(tokens[-1])
        if tokens[-1] == lm.tokenizer.eos_token_id:
            break
    return tokens, layers


@pytest.mark.parametrize("length", sorted(PROMPTS))
def test_cached_generation_without_exits_equals_transformers_greedy(lm, length) -> None:
    ids = ids_of(lm, PROMPTS[length])
    out = generate(lm, ids, NoExit(), (1, 2, 3, 4), max_new_tokens=10)
    assert out.tokens == greedy(lm, ids, 10)
    assert out.layers == [LAYERS] * len(out.tokens) and out.recomputed == out.filled == 0


def test_an_exit_at_the_last_layer_equals_the_normal_forward(lm) -> None:
    ids = ids_of(lm, PROMPTS[19])
    stack = LayerStack(lm)
    stack.feed(ids[:-1])
    out, layer = stack.feed(ids[-1:], rule=FixedExit(LAYERS), exits=(LAYERS,))
    with torch.no_grad():
        expected = lm.model(torch.tensor([ids])).logits[0, -1]
    assert layer == LAYERS
    torch.testing.assert_close(stack.anatomy.logits(out[0, -1]), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_a_fixed_exit_equals_the_first_blocks_and_the_head(lm, layer) -> None:
    ids = ids_of(lm, PROMPTS[5])
    stack = LayerStack(lm)
    stack.feed(ids[:-1])
    rule, exits = exit_rule(f"fixed:{layer}", lm, "auto", 0.9)
    out, ran = stack.feed(ids[-1:], rule=rule, exits=exits, kv="copy")
    with torch.no_grad():  # the direct computation: the first L blocks, then norm and head
        direct = lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer]
    assert ran == layer and stack.filled == LAYERS - layer
    anatomy = Anatomy.of(lm.model)
    torch.testing.assert_close(anatomy.logits(out[0, -1]), anatomy.logits(direct[0, -1]),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


@pytest.mark.parametrize("length", sorted(PROMPTS))
def test_self_speculation_equals_greedy_for_every_draft_exit(lm, length) -> None:
    ids = ids_of(lm, PROMPTS[length])
    expected = greedy(lm, ids, 12)
    for draft_layer in (1, 2, 3):
        for draft_tokens in (1, 4):
            out = speculate(lm, ids, draft_layer, draft_tokens=draft_tokens, max_new_tokens=12)
            assert out.tokens == expected, (draft_layer, draft_tokens)
            assert 0 <= out.accepted <= out.drafted and out.rounds >= 1


def test_recompute_equals_uncached_generation_under_the_same_exits(lm) -> None:
    ids = ids_of(lm, PROMPTS[5])
    exits = (1, 2, 3, LAYERS)
    layers_seen = set()
    for bar in (-0.5, 0.0, 0.5):  # thresholds that exit some tokens early and not others
        rule = SignRule(bar)
        out = generate(lm, ids, rule, exits, kv="recompute", max_new_tokens=12)
        tokens, layers = uncached(lm, ids, rule, exits, 12)
        assert (out.tokens, out.layers) == (tokens, layers), bar
        layers_seen |= set(layers)
        if len(set(layers)) > 1 and layers[-1] == max(layers) != layers[0]:
            assert out.recomputed > 0  # a deeper token ran the pending ones
    assert len(layers_seen) > 1, "no threshold made exits differ: the test would prove nothing"


def test_recompute_keeps_each_layer_a_prefix_of_the_positions(lm) -> None:
    ids = ids_of(lm, PROMPTS[5])
    stack = LayerStack(lm)
    stack.feed(ids[:-1])
    token = ids[-1]
    for step, depth in enumerate((1, 3, 2, 4, 1)):
        _, ran = stack.feed([token], rule=FixedExit(depth), exits=(1, 2, 3, 4))
        token = (token + 7) % 256
        fed = len(ids) + step
        lengths = stack.cache.lengths()
        assert ran == depth and lengths[depth - 1] == fed
        assert lengths == sorted(lengths, reverse=True)  # deeper layers: shorter prefixes
    assert stack.cache.lengths()[LAYERS - 1] == len(ids) + 3  # filled up to the depth-4 token


def test_copy_fills_every_layer_with_keys_and_values_of_the_right_shape(lm) -> None:
    ids = ids_of(lm, PROMPTS[5])
    stack = LayerStack(lm)
    stack.feed(ids[:-1])
    full = [(layer.keys.shape, layer.values.shape) for layer in stack.cache.layers]
    stack.feed(ids[-1:], rule=FixedExit(1), exits=(1, LAYERS), kv="copy")
    assert stack.cache.lengths() == [len(ids)] * LAYERS
    for (keys, values), layer in zip(full, stack.cache.layers, strict=True):
        assert layer.keys.shape == (*keys[:2], len(ids), keys[3])
        assert layer.values.shape == (*values[:2], len(ids), values[3])
    out = generate(lm, ids, FixedExit(2), (2, LAYERS), kv="copy", max_new_tokens=6)
    assert out.filled == len(out.tokens) * (LAYERS - 2) and out.layers == [2] * len(out.tokens)


def test_copy_writes_the_exit_state_through_the_skipped_layers_projections() -> None:
    lm = deep("llama")
    ids = ids_of(lm, PROMPTS[5])
    stack = LayerStack(lm)
    stack.feed(ids[:-1])
    stack.feed(ids[-1:], rule=FixedExit(1), exits=(1, LAYERS), kv="copy")
    exit_state = stack.hidden[0, -1]  # the state after block 1, kept by the stack
    for index in range(1, LAYERS):  # values carry no rotary: v_proj(input_layernorm(h))
        block = stack.blocks[index]
        with torch.no_grad():
            value = block.self_attn.v_proj(block.input_layernorm(exit_state))
        cached = stack.cache.layers[index].values[0, :, -1].reshape(-1)
        torch.testing.assert_close(cached, value, atol=1e-5, rtol=1e-5)


def test_confidence_exits_where_the_top_probability_reaches_tau() -> None:
    lm = deep("llama")
    head = ExitHead(Anatomy.of(lm.model))
    state = torch.randn(64)
    with torch.no_grad():
        top = float(torch.softmax(head(state), -1).max())
    assert ConfidenceExit(head, top * 0.999).should_exit(1, state)
    assert not ConfidenceExit(head, min(top * 1.001, 0.999)).should_exit(1, state)
    ids = ids_of(lm, PROMPTS[5])  # a tau below every top probability exits at the first exit
    out = generate(lm, ids, ConfidenceExit(head, 1e-6), (1, 3, LAYERS), head=head,
                   max_new_tokens=5)  # fmt: skip
    assert out.layers == [1] * len(out.tokens)


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda lm: exit_rule("fixed:9", lm, "auto", 0.9), "exit layer 9 is outside the model"),
        (lambda lm: exit_rule("fixed:0", lm, "auto", 0.9), "exit layer 0 is outside the model"),
        (lambda lm: exit_rule("confidence", lm, "2,7", 0.9), "exit layer 7 is outside"),
        (lambda lm: exit_rule("confidence", lm, "auto", 1.0), "--tau must be in (0, 1)"),
        (lambda lm: exit_rule("confidence", lm, "auto", 0.0), "--tau must be in (0, 1)"),
        (lambda lm: exit_rule("sometimes", lm, "auto", 0.5), "choose none, fixed:L"),
        (lambda lm: exit_rule("policy", lm, "auto", 0.5), "--policy DIR"),
        (lambda lm: speculate(lm, [1, 2], 4), "must be in 1..3"),
        (lambda lm: speculate(lm, [1, 2], 0), "must be in 1..3"),
        (lambda lm: generate(lm, [1], NoExit(), (4,), kv="paste"), "choose copy or recompute"),
        (lambda lm: generate(lm, [], NoExit(), (4,)), "the prompt is empty"),
    ],
)
def test_bad_input_is_one_clear_error(call, needle) -> None:
    with pytest.raises(OptlabError, match=None) as error:
        call(deep("llama"))
    assert needle in str(error.value) and "\n" not in str(error.value)
