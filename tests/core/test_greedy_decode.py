"""The greedy decoder: token for token Hugging Face's greedy ``generate`` (batch 1 and left
padded batches, every family), its stops, its static cache lengths, and the compiled step:
the same tokens for fp32 and packed layers, and a clean fallback without a compiler."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from optlab.core import decode
from optlab.core.decode import cache_length, compiler_available, greedy
from optlab.core.models import load_model
from optlab.quant.apply import quantize_rtn_model
from optlab.quant.linear import QuantLinear


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 9, 1)]


def _hf_greedy(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Hugging Face generate over one left-padded batch, no EOS stop (its dynamic cache)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, pad_token_id=0)  # fmt: skip
    return out[:, width:].tolist()


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "gpt_neox", "gemma3_text"])
def test_greedy_over_the_static_cache_is_generates_greedy(family) -> None:
    """gemma3_text has sliding-window layers (window 8 < prompt + new tokens)."""
    model = load_model(f"tiny:{family}").model
    prompts = _prompts()
    batched = greedy(model, prompts, 8, eos=())
    assert batched == _hf_greedy(model, prompts, 8)
    assert batched == [_hf_greedy(model, [p], 8)[0] for p in prompts]  # padding changes nothing


@pytest.mark.skipif(not compiler_available(), reason="torch.compile needs a C++ compiler")
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "gpt_neox", "gemma3_text"])
def test_the_compiled_step_is_generates_greedy_for_every_family(family) -> None:
    """llama and gemma3_text have grouped-query attention (2 key heads for 4 query heads),
    which the compiled step computes without repeating the cache."""
    model = load_model(f"tiny:{family}").model
    prompts = _prompts()
    assert greedy(model, prompts, 8, eos=(), compile=True) == _hf_greedy(model, prompts, 8)
    assert model.config._attn_implementation == "sdpa"  # set back after every step
    decode._compiled.pop(model)


def test_grouped_attention_of_one_query_token_is_attention_over_repeated_keys() -> None:
    module = types.SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, 1, 8, generator=g)
    key, value = torch.randn(2, 2, 16, 8, generator=g), torch.randn(2, 2, 16, 8, generator=g)
    mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    mask[0, ..., :5] = False  # a left-padded row
    mask[:, ..., 12:] = False  # the cache's future slots
    out, _ = decode._grouped_attention(module, query, key, value, mask, scaling=0.3)
    # query head h reads key head h // 3
    keys, values = key.repeat_interleave(3, 1), value.repeat_interleave(3, 1)
    scores = (query @ keys.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    expected = (scores.softmax(-1) @ values).transpose(1, 2)
    assert out.shape == (2, 1, 6, 8)
    assert torch.allclose(out, expected, atol=1e-6)
    # more than one query token (a prefill) is transformers' own function, unchanged
    prefill = torch.randn(2, 6, 4, 8, generator=g)
    wide = torch.ones(2, 1, 4, 16, dtype=torch.bool)
    ours, _ = decode._grouped_attention(module, prefill, key, value, wide, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, prefill, key, value, wide, scaling=0.3)
    assert torch.equal(ours, theirs)


def test_rows_stop_at_eos_or_their_own_stop_rule_and_the_batch_when_all_have() -> None:
    model = load_model("tiny:llama").model
    prompts = _prompts()
    full = greedy(model, prompts, 8, eos=())
    eos = full[0][2]
    stopped = greedy(model, prompts, 8, eos={eos})
    for row, got in zip(full, stopped, strict=True):
        end = row.index(eos) + 1 if eos in row else len(row)
        assert got == row[:end]  # the EOS token is kept, nothing after it
    calls = []

    def stop(r: int, new: list[int]) -> bool:
        calls.append(r)
        return (r == 1 and len(new) == 3) or len(new) == 5

    assert greedy(model, prompts, 8, eos=(), stop=stop) == [full[0][:5], full[1][:3], full[2][:5]]
    assert calls.count(1) == 3  # a stopped row is not asked again


def test_static_cache_lengths_are_powers_of_two_within_the_context() -> None:
    assert [cache_length(n) for n in (1, 64, 65, 129, 1000)] == [64, 64, 128, 256, 1024]
    assert cache_length(300, limit=256) == 512  # the context cannot hold it: not capped
    assert cache_length(200, limit=256) == 256
    assert cache_length(3000, limit=2048 * 4) == 4096


def _mixed_model():
    """tiny:llama with block 0 packed (4 bits, groups of 32, and its MLP down projection at
    8 bits per channel) and block 1 left in fp32: both kinds of layers in one graph."""
    model = load_model("tiny:llama").model
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    bitmap = {f"model.layers.0.self_attn.{n}": 4 for n in names}
    bitmap |= {"model.layers.0.mlp.gate_proj": 4, "model.layers.0.mlp.up_proj": 4}
    quantize_rtn_model(model, bitmap, 32)
    quantize_rtn_model(model, {"model.layers.0.mlp.down_proj": 8}, None)
    return model


@pytest.mark.skipif(not compiler_available(), reason="torch.compile needs a C++ compiler")
def test_the_compiled_step_decodes_fp32_and_packed_layers_token_for_token() -> None:
    model = _mixed_model()
    prompt = _prompts()[1]
    plain = _hf_greedy(model, [prompt], 6)[0]
    assert greedy(model, [prompt], 6, eos=()) == [plain]
    assert greedy(model, [prompt], 6, eos=(), compile=True) == [plain]
    # each layer's decoding kernel built its layout: torch's int4 GEMM, in bf16 (on this model
    # and prompt its tokens still equal fp32 arithmetic's); the 8-bit layer as two halves
    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == 7 and all("tinygemm" in m._cache for m in packed)
    assert decode._compiled[model] is not None
    decode._compiled.pop(model)


def test_without_a_compiler_greedy_warns_once_and_decodes_the_same(monkeypatch, caplog) -> None:
    model = _mixed_model()
    prompts = _prompts()
    expected = greedy(model, prompts, 5, eos=())
    monkeypatch.setattr(decode, "compiler_available", lambda device="cpu": False)
    with caplog.at_level(logging.WARNING, logger="optlab"):
        assert greedy(model, prompts, 5, eos=(), compile=True) == expected
        assert greedy(model, prompts, 5, eos=(), compile=True) == expected
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "C++ compiler" in caplog.records[0].message
    decode._compiled.pop(model)


def test_a_compile_that_fails_falls_back_to_eager_decoding(monkeypatch, caplog) -> None:
    model = load_model("tiny:llama").model
    prompts = _prompts()
    expected = greedy(model, prompts, 5, eos=())

    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error")

    monkeypatch.setattr(decode, "compiler_available", lambda device="cpu": True)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    with caplog.at_level(logging.WARNING, logger="optlab"):
        assert greedy(model, prompts, 5, eos=(), compile=True) == expected
    assert "torch.compile failed (InductorError" in caplog.text
    assert decode._compiled[model] is None  # not tried again for this model
    decode._compiled.pop(model)


def _half_head_model(dtype: torch.dtype = torch.float16):
    """tiny:llama with its (tied) head rounded to ``dtype`` values, as a quantized run's is."""
    model = load_model("tiny:llama").model
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        weight.copy_(weight.to(dtype).float())
    return model


def test_a_half_width_head_computes_f_linear_inside_torch_compile() -> None:
    head = torch.nn.Linear(64, 300, bias=True)
    with torch.no_grad():
        head.weight.copy_(head.weight.half().float())
    wide = decode.HalfWidthHead.of(head)
    assert wide.weight is head.weight and wide.bias is head.bias
    wide.prepare_decode()
    assert wide._narrow["weight"].dtype == torch.float16
    x = torch.randn(2, 1, 64)
    expected = torch.nn.functional.linear(x, head.weight, head.bias)
    assert torch.equal(wide(x), expected)  # eager: F.linear itself
    if compiler_available():
        assert torch.allclose(torch.compile(wide, dynamic=False)(x), expected, atol=1e-5,
                              rtol=1e-5)  # fmt: skip
        # and it is the narrow copy that the compiled graph reads
        poisoned = decode.HalfWidthHead.of(head)
        poisoned.prepare_decode()
        poisoned._narrow["weight"] = torch.zeros(300, 64, dtype=torch.float16)
        out = torch.compile(poisoned, dynamic=False)(x)
        assert torch.equal(out, head.bias.detach().expand(2, 1, 300))


def test_the_narrow_copy_follows_the_weight() -> None:
    head = torch.nn.Linear(32, 50, bias=False)
    wide = decode.HalfWidthHead.of(head)
    wide.prepare_decode()
    assert "weight" not in wide._narrow  # random fp32 values: not exact in 16 bits
    with torch.no_grad():  # bf16 values beyond fp16's range (bf16 values within it fit fp16)
        head.weight.copy_((head.weight * 1e6).bfloat16().float())
    wide.prepare_decode()  # an in-place update is seen through the version counter
    assert wide._narrow["weight"].dtype == torch.bfloat16
    assert torch.equal(wide._narrow["weight"].float(), head.weight)
    with torch.no_grad():
        head.weight.add_(torch.rand(50, 32))
    wide.prepare_decode()
    assert "weight" not in wide._narrow  # no longer exact: the step falls back to F.linear
    wide.load_state_dict({"weight": torch.zeros(50, 32)})
    wide.prepare_decode()
    assert torch.equal(wide._narrow["weight"], torch.zeros(50, 32, dtype=torch.float16))


def test_only_a_plain_head_of_exact_values_is_made_half_width() -> None:
    model = load_model("tiny:llama").model
    decode._half_width_head(model)
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # random fp32 weights
    model = _half_head_model()
    keys, weight = list(model.state_dict()), model.get_output_embeddings().weight
    decode._half_width_head(model)
    head = model.get_output_embeddings()
    assert isinstance(head, decode.HalfWidthHead)
    assert list(model.state_dict()) == keys
    assert head.weight is weight  # the very parameter: a tied head stays tied


@pytest.mark.skipif(not compiler_available(), reason="torch.compile needs a C++ compiler")
def test_the_compiled_step_with_a_half_width_head_decodes_token_for_token() -> None:
    model = _half_head_model()
    prompts = _prompts()
    plain = _hf_greedy(model, prompts, 6)
    assert greedy(model, prompts, 6, eos=(), compile=True) == plain
    head = model.get_output_embeddings()
    assert isinstance(head, decode.HalfWidthHead) and "weight" in head._narrow
    # the weights change after the step was built (training between evaluations): the
    # compiled step reads the new values, not a stale narrow copy
    with torch.no_grad():
        head.weight.copy_(head.weight.flip(0))
    assert greedy(model, prompts, 6, eos=(), compile=True) == _hf_greedy(model, prompts, 6)
    assert len(decode._compiled[model]) == 1  # an in-place update is no new structure
    decode._compiled.pop(model)


@pytest.mark.skipif(not compiler_available(), reason="torch.compile needs a C++ compiler")
def test_the_compiled_step_follows_the_models_structure_not_only_its_tensors() -> None:
    """dynamo's guards on the model's modules are dropped (its tensors' stay): a hook or a
    plain attribute changed after the step was built must still reach the compiled step."""
    model = load_model("tiny:llama").model
    prompts = _prompts()
    plain = greedy(model, prompts, 6, eos=(), compile=True)
    assert plain == _hf_greedy(model, prompts, 6)
    mlp = model.model.layers[1].mlp
    handle = mlp.register_forward_hook(lambda module, args, out: 40 * out)
    hooked = _hf_greedy(model, prompts, 6)
    assert hooked != plain  # the hook matters
    assert greedy(model, prompts, 6, eos=(), compile=True) == hooked
    handle.remove()
    assert greedy(model, prompts, 6, eos=(), compile=True) == plain  # its first graph again
    for layer in model.model.layers:  # a float the attention's forward reads
        layer.self_attn.scaling *= 8
    sharper = _hf_greedy(model, prompts, 6)
    assert sharper != plain
    assert greedy(model, prompts, 6, eos=(), compile=True) == sharper
    assert len(decode._compiled[model]) == 3
    other = load_model("tiny:llama").model  # the same classes and shapes, a graph of its own
    assert greedy(other, prompts, 6, eos=(), compile=True) == plain
    decode._compiled.pop(model)
    decode._compiled.pop(other)
