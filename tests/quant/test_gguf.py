"""GGUF export: files transformers reads back with the same logits, llama.cpp's names and
layouts, exact Q4_1 blocks for optlab's 4-bit codes, and what is refused."""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from optlab.api import export, prune, quantize
from optlab.core.models import _IDS, LoadedModel, byte_tokenizer, load_model
from optlab.errors import OptlabError
from optlab.pruning.pruner import MagnitudeConfig
from optlab.quant.gguf_export import ExportConfig, GGUFPlan
from optlab.quant.gguf_types import TYPES, bits_per_weight, decode
from optlab.quant.linear import QuantLinear
from optlab.quant.quantize import RTNConfig, StorageConfig, TDMPQConfig, UniformConfig
from tests.conftest import random_ids

TEXT = "The cat sat on the mat; 42 dogs ran.\n"
_SMALL = dict(_IDS, vocab_size=320, intermediate_size=128, num_key_value_heads=2)


def tiny_lm(family: str) -> LoadedModel:
    """A tiny model of ``family`` whose config every GGUF reader rebuilds as it is: GPT-2 with
    transformers' fixed 1024 positions, Gemma 3 in its fixed layer pattern with head_dim =
    query_pre_attn_scalar = 256 (the file states neither)."""
    if family in ("llama", "qwen2"):
        return load_model(f"tiny:{family}")
    kwargs = {"gpt2": dict(_IDS, n_embd=64, n_layer=2, n_head=4, vocab_size=320),
              "gemma3_text": dict(_SMALL, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, head_dim=256, sliding_window=8,
                                  query_pre_attn_scalar=256,
                                  max_position_embeddings=256)}[family]  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs)).eval()
    return LoadedModel(model, byte_tokenizer(), f"tiny-{family}")


def read_back(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


# Every type optlab writes, in one file per family transformers' GGUF reader loads (it has no
# gptneox): the block linears take the types in turn, the embedding table one more.
@pytest.mark.parametrize(
    ("family", "embed_type"),
    [("llama", "q8_0"), ("qwen2", "q5_0"), ("gpt2", "f16"), ("gemma3_text", "q4_1")],
)
def test_the_file_loads_in_transformers_with_the_same_logits(tmp_path, family, embed_type) -> None:
    lm = tiny_lm(family)
    names = [n for n, m in lm.model.named_modules() if ".h." in n or ".layers." in n
             if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]  # fmt: skip
    kinds = list(TYPES)
    types = {name: kinds[i % len(kinds)] for i, name in enumerate(names)}
    plan = GGUFPlan(lm, embed_type=embed_type, linear_types=types)
    plan.encode(apply=True, progress=False)  # lm.model now holds the file's weights
    path = tmp_path / "m.gguf"
    summary = plan.write(path, progress=False)
    assert summary["file_bytes"] == path.stat().st_size == plan.predicted_bytes()
    assert set(TYPES) <= set(summary["tensor_types"])
    model, tokenizer = read_back(path)
    ids = random_ids(2, 24)  # longer than gemma's sliding window of 8
    with torch.no_grad():
        ours, theirs = lm.model(ids).logits, model(ids).logits
    # The same weights: only the order of summation differs.
    assert torch.allclose(theirs, ours, atol=2e-5, rtol=0), (theirs - ours).abs().max()
    assert tokenizer(TEXT).input_ids == lm.tokenizer(TEXT).input_ids


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_an_f32_file_is_the_model_itself(tmp_path, family) -> None:
    lm = tiny_lm(family)
    path = tmp_path / "m.gguf"
    export(lm, ExportConfig(weight_type="f32", embed_type="f32"), out=path, progress=False)
    model, _ = read_back(path)
    ids = random_ids(2, 24)
    with torch.no_grad():  # gemma's norms travel as 1 + w and back: fp32 rounding only
        assert torch.allclose(model(ids).logits, lm.model(ids).logits, atol=2e-5, rtol=0)


def test_metadata_round_trips(tmp_path) -> None:
    lm = load_model("tiny:llama")
    lm.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = tmp_path / "m.gguf"
    export(lm, ExportConfig(weight_type="q8_0"), out=path, progress=False)
    reader = gguf.GGUFReader(path)
    field = {k: f.contents() for k, f in reader.fields.items()}
    config = lm.model.config
    assert field["general.architecture"] == "llama"
    assert (field["llama.block_count"], field["llama.embedding_length"],
            field["llama.feed_forward_length"], field["llama.attention.head_count"],
            field["llama.attention.head_count_kv"], field["llama.context_length"],
            field["llama.rope.dimension_count"], field["llama.vocab_size"]) == (
        2, 64, 128, 4, 2, 256, 16, 320)  # fmt: skip
    assert field["llama.rope.freq_base"] == config.rope_parameters["rope_theta"]
    assert field["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert field["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    tokens = field["tokenizer.ggml.tokens"]
    vocab = lm.tokenizer.get_vocab()
    assert len(tokens) == 320 and all(tokens[i] == t for t, i in vocab.items())
    assert tokens[300] == "[PAD300]"  # embedding rows beyond the tokenizer: unused tokens
    assert field["tokenizer.ggml.model"] == "gpt2"
    assert field["tokenizer.ggml.eos_token_id"] == field["tokenizer.ggml.bos_token_id"] == 256
    assert field["tokenizer.ggml.add_bos_token"] is False
    assert field["tokenizer.chat_template"] == lm.tokenizer.chat_template
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in (
            "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
            "attn_norm", "ffn_norm")}  # fmt: skip
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert set(types) == expected
    assert {types[n] for n in expected if "norm" in n} == {"F32"}
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == "Q8_0"


def test_llama_q_and_k_rows_are_permuted_as_llama_cpp_does(tmp_path) -> None:
    lm = load_model("tiny:llama")
    path = tmp_path / "m.gguf"
    export(lm, ExportConfig(weight_type="f32"), out=path, progress=False)
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    q = lm.model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    k = lm.model.model.layers[0].self_attn.k_proj.weight.detach().numpy()
    # Head h, pair i: rows (h, i) and (h, i + d/2) of rotate-half become rows 2i and 2i + 1.
    for w, heads, name in ((q, 4, "attn_q"), (k, 2, "attn_k")):
        d = w.shape[0] // heads
        expect = np.stack([w.reshape(heads, 2, d // 2, -1)[:, j] for j in (0, 1)], axis=2)
        assert np.array_equal(stored[f"blk.0.{name}.weight"], expect.reshape(w.shape))
    v = lm.model.model.layers[0].self_attn.v_proj.weight.detach().numpy()
    assert np.array_equal(stored["blk.0.attn_v.weight"], v)


def test_gpt_neox_qkv_is_regrouped_and_named_for_llama_cpp(tmp_path) -> None:
    lm = load_model("tiny:gpt_neox")  # transformers' GGUF reader has no gptneox: read it raw
    path = tmp_path / "m.gguf"
    summary = export(lm, ExportConfig(weight_type="f32"), out=path, progress=False)
    reader = gguf.GGUFReader(path)
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    attn = lm.model.gpt_neox.layers[1].attention.query_key_value
    w, b = attn.weight.detach().numpy(), attn.bias.detach().numpy()
    heads, d = 4, 16
    regroup = [w.reshape(heads, 3, d, 64)[:, j].reshape(-1, 64) for j in range(3)]
    assert np.array_equal(stored["blk.1.attn_qkv.weight"], np.concatenate(regroup))
    assert np.array_equal(
        stored["blk.1.attn_qkv.bias"],
        np.concatenate([b.reshape(heads, 3, d)[:, j].ravel() for j in range(3)]),
    )
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["gptneox.rope.dimension_count"] == 4  # 0.25 of the head
    assert fields["gptneox.use_parallel_residual"] is True
    assert summary["architecture"] == "gptneox" and "output.weight" in stored


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (3, 64), (2, 0)])
def test_optlab_codes_become_exact_q4_1_blocks(tmp_path, bits, group) -> None:
    lm = load_model("tiny:llama")
    quantize(
        lm,
        UniformConfig(uniform=bits),
        quantizer=RTNConfig(group_size=group),
        storage=StorageConfig(rest_dtype="model"),
        progress=False,
    )
    path = tmp_path / "q.gguf"
    summary = export(lm, out=path, progress=False)
    assert summary["exact_tensors"] == 14 and summary["tensor_types"]["q4_1"] == 14
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    layer: QuantLinear = lm.model.model.layers[1].mlp.down_proj
    tensor = stored["blk.1.ffn_down.weight"]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
    file_weight = decode(np.array(tensor.data), "q4_1").reshape(64, 128)
    # Exactly d q + m with d = s and m = fp16(-z s): the codes are the run's own.
    codes, scales, zeros = layer.codes(), layer.scales.float(), layer.zeros.float()
    size = layer.group_size
    s = scales.repeat_interleave(size, 1)[:, :128].numpy()
    m = (-zeros * scales).half().float().repeat_interleave(size, 1)[:, :128].numpy()
    assert np.array_equal(file_weight, codes.numpy() * s + m)
    ours = layer.dequantized_weight().numpy()
    bound = (zeros * scales).abs().max().item() * 2.0**-11  # half an fp16 ulp of m, at most
    assert 0 < np.abs(file_weight - ours).max() <= bound or np.array_equal(file_weight, ours)


def test_a_quantize_run_and_a_pruned_run_export_from_their_folders(tmp_path) -> None:
    calib = torch.randint(0, 256, (4, 32))
    quantize(
        "tiny:llama",
        UniformConfig(uniform=8),
        quantizer=RTNConfig(group_size=32),
        out=tmp_path / "q8",
        progress=False,
    )
    summary = export(tmp_path / "q8", out=tmp_path / "q8.gguf", progress=False)
    assert summary["tensor_types"]["q8_0"] == 16  # 8 bits: re-rounded to Q8_0, no exact type
    prune(
        "tiny:llama", MagnitudeConfig(sparsity=0.5), calib=calib, out=tmp_path / "p", progress=False
    )
    export(tmp_path / "p", out=tmp_path / "p.gguf", progress=False)
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "p.gguf").tensors}
    assert (stored["blk.0.ffn_up.weight"] == 0).mean() == 0.5  # F16 keeps every zero
    assert load_model(str(tmp_path / "p.gguf")).family == "llama"


def test_opt_and_unwritable_targets_are_refused(tmp_path) -> None:
    with pytest.raises(OptlabError, match=r"llama\.cpp has no OPT architecture"):
        export("tiny:opt", out=tmp_path / "o.gguf", progress=False)
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model")
    with pytest.raises(OptlabError, match=r"exists and is not a \.gguf file"):
        export("tiny:llama", out=notes, force=True, progress=False)
    assert notes.read_text() == "not a model"
    with pytest.raises(OptlabError, match=r"not a \.gguf file"):
        export("tiny:llama", out=tmp_path / "m.bin", progress=False)
    ours = tmp_path / "m.gguf"
    export("tiny:llama", out=ours, progress=False)
    with pytest.raises(OptlabError, match="pass --force"):
        export("tiny:llama", out=ours, progress=False)
    before = ours.stat().st_size
    export("tiny:llama", ExportConfig(weight_type="q4_0"), out=ours, force=True, progress=False)
    assert ours.stat().st_size < before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "notes.gguf"]


# --- allocation over GGUF types under the file's byte budget ---------------------------------


def _plan_and_units(lm):
    from optlab.quant.sensitivity import sensitivity_units

    return GGUFPlan(lm), sensitivity_units(lm.model, "layer")


def test_the_gguf_allocation_is_the_best_one_within_the_budget() -> None:
    import itertools

    from optlab.quant.quantize import allocate_gguf

    plan, units = _plan_and_units(load_model("tiny:llama"))
    ladder = ("q8_0", "q5_1", "q4_1", "q4_0")
    scores = {"model.layers.0": 10.0, "model.layers.1": 0.1}
    slot = {s.key.removesuffix(".weight"): s for s in plan.slots}
    members = {n for names in units.values() for n in names}
    fixed = plan.fixed_bytes() + sum(plan.tensor_bytes(s) for n, s in slot.items()
                                     if n not in members)  # fmt: skip

    def size(choice):  # the whole file, by hand
        return fixed + sum(plan.tensor_bytes(slot[n], t) for u, t in choice.items()
                           for n in units[u])  # fmt: skip

    def value(choice):  # the allocator's objective: damage avoided, halving per bit
        low = min(bits_per_weight(t) for t in ladder)
        return sum(s * (1 - 2.0 ** -(bits_per_weight(choice[u]) - low)) for u, s in scores.items())

    for budget in (
        size(dict.fromkeys(units, "q4_0")),
        size({"model.layers.0": "q8_0", "model.layers.1": "q4_0"}) + 7,
        size(dict.fromkeys(units, "q5_1")) + 100,
    ):
        chosen = allocate_gguf(plan, units, scores, ladder, budget)
        assert size(chosen) <= budget
        feasible = [dict(zip(units, c, strict=True)) for c in itertools.product(ladder, repeat=2)
                    if size(dict(zip(units, c, strict=True))) <= budget]  # fmt: skip
        assert value(chosen) >= max(value(c) for c in feasible) - 1e-9
    assert chosen == dict.fromkeys(units, "q5_1") or value(chosen) > value(
        dict.fromkeys(units, "q5_1"))  # fmt: skip
    with pytest.raises(OptlabError, match="below the smallest file"):
        allocate_gguf(plan, units, scores, ladder, size(dict.fromkeys(units, "q4_0")) - 1)


def test_quantize_format_gguf_writes_the_allocation_within_the_budget(tmp_path) -> None:
    from optlab.api import quantize as quantize_api
    from optlab.core.calibration import Calibration
    from optlab.eval.perplexity import PerplexityEval
    from optlab.quant.quantize import AvgBitsConfig, MaxSizeConfig

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"sentence {i} about small models." for i in range(300)))
    calib = Calibration(corpus=str(text), n=4, seq_len=32, batch_size=4)
    evaluation = PerplexityEval(limit=2, seq_len=32)
    sizes = [GGUFPlan(load_model("tiny:llama"), weight_type=t).predicted_bytes()
             for t in ("q4_0", "q8_0")]  # fmt: skip
    budget = sum(sizes) / 2e6  # MB, between the two uniform files
    result = quantize_api("tiny:llama", MaxSizeConfig(max_size_mb=budget),
                          sensitivity=TDMPQConfig(per_linear=True),
                          storage=StorageConfig(format="gguf", embed_type="q8_0"), calib=calib,
                          evaluation=evaluation, out=tmp_path / "g", progress=False)  # fmt: skip
    path = tmp_path / "g" / "model.gguf"
    assert path.stat().st_size == result["file_bytes"] <= budget * 1e6
    stored = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors}
    types = result["types_per_unit"]  # one unit per linear
    assert len(set(types.values())) > 1  # the budget sits between two uniform files
    family = GGUFPlan(load_model("tiny:llama")).family
    assert {stored[family.gguf_name(f"{u}.weight")] for u in types} == set(types.values())
    assert all(stored[family.gguf_name(f"{u}.weight")] == t for u, t in types.items())
    # The perplexity reported is the file's: transformers' reading of it gives the same.
    again = load_model(str(tmp_path / "g"))
    assert evaluation.measure(again, 32, False)["perplexity"] == pytest.approx(
        result["perplexity_after"]["perplexity"], rel=1e-4)  # fmt: skip
    with pytest.raises(OptlabError, match="written already"):
        export(tmp_path / "g", out=tmp_path / "again.gguf", progress=False)
    with pytest.raises(OptlabError, match="byte budget"):
        quantize_api("tiny:llama", UniformConfig(uniform=4),
                     storage=StorageConfig(format="gguf"), progress=False)  # fmt: skip
    with pytest.raises(OptlabError, match="GPTQ"):
        from optlab.quant.quantize import GPTQConfig

        quantize_api("tiny:llama", AvgBitsConfig(avg_bits=7.0), quantizer=GPTQConfig(),
                     storage=StorageConfig(format="gguf"), progress=False)  # fmt: skip
    with pytest.raises(OptlabError, match="embed-type"):
        StorageConfig(format="gguf", embed_bits=4)
