"""The greedy decoder: token for token Hugging Face's greedy ``generate`` (batch 1 and left
padded batches, every family), its stops, its static cache lengths, and the compiled step:
the same tokens for fp32 and packed layers, and a clean fallback without a compiler."""

from __future__ import annotations

import logging

import pytest
import torch

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
