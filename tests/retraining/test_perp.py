import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.data import load_text, sample_windows
from optlab.core.models import load_model
from optlab.errors import OptlabError
from optlab.retraining.lora import LoraLinear, add_adapters
from optlab.retraining.perp import (
    PerpConfig,
    masks_of,
    parameter_counts,
    retrain,
    select_trainable,
    sparsity_report,
    untie_head,
)
from tests.conftest import random_ids
from tests.retraining.conftest import is_2_4, prune_2_4, prune_rows

# Small and fast: a few steps of 2 x 32-token micro-batches.
QUICK = dict(steps=2, seq_len=32, rank=4, alpha=8.0, lr=1e-2)


def _same_masks(before: dict, after: dict) -> bool:
    return before.keys() == after.keys() and all(
        torch.equal(m, after[n]) for n, m in before.items()
    )


def _no_adapters(model) -> bool:
    return not any(isinstance(m, LoraLinear) for m in model.modules())


@pytest.mark.parametrize("method", ["perp", "full"])
def test_retraining_keeps_the_mask_exactly_on_every_family(tiny, corpus, method) -> None:
    prune_rows(tiny.model)
    before = masks_of(tiny.model)
    weights = {n: weight_matrix(m).clone() for n, m in _named_linears(tiny.model)}
    metrics = retrain(tiny, PerpConfig(method=method, corpus=corpus, **QUICK), progress=False)
    assert _same_masks(before, masks_of(tiny.model))
    assert metrics["mask_held"] and metrics["regrown"] == metrics["newly_zero"] == 0
    assert metrics["sparsity_after"] == metrics["sparsity_before"]
    assert metrics["sparsity_after"]["total"] == pytest.approx(0.5)
    assert all(math.isfinite(loss) for loss in metrics["losses"])
    assert _no_adapters(tiny.model)
    # The surviving weights really changed: the mask held because of the method, not idleness.
    assert any(not torch.equal(weights[n], weight_matrix(m)) for n, m in _named_linears(tiny.model))


def _named_linears(model):
    anatomy = Anatomy.of(model)
    for index, block in enumerate(anatomy.blocks):
        for name, linear in anatomy.linears(block).items():
            yield f"{index}.{name}", linear


@pytest.mark.parametrize("lora", ["prune", "scalel"])
def test_2_4_pattern_survives_retraining(corpus, lora) -> None:
    lm = load_model("tiny:gpt2")
    prune_2_4(lm.model)
    before = masks_of(lm.model)
    metrics = retrain(lm, PerpConfig(lora=lora, corpus=corpus, **QUICK), progress=False)
    assert metrics["mask_held"] and _same_masks(before, masks_of(lm.model))
    assert all(is_2_4(weight_matrix(m)) for _, m in _named_linears(lm.model))


def test_plain_lora_is_reported_as_losing_the_mask(corpus) -> None:
    lm = load_model("tiny:llama")
    prune_rows(lm.model)
    metrics = retrain(lm, PerpConfig(lora="plain", corpus=corpus, **QUICK), progress=False)
    assert not metrics["mask_held"] and metrics["regrown"] > 0
    assert metrics["sparsity_after"]["total"] < metrics["sparsity_before"]["total"]


def _loss(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=windows, labels=windows).loss.item()


def test_a_few_steps_lower_the_training_loss(tmp_path, corpus) -> None:
    lm = load_model("tiny:opt")
    prune_rows(lm.model)
    # The windows of a 40-token text overlap heavily: 20 steps see nearly one fixed batch.
    fixed = tmp_path / "fixed.txt"
    fixed.write_text(load_text(corpus)[:40], encoding="utf-8")
    windows = sample_windows(lm.tokenizer, fixed.read_text(), 8, 32, seed=0)
    before = _loss(lm.model, windows)
    config = PerpConfig(steps=20, seq_len=32, rank=4, alpha=8.0, lr=5e-3, corpus=str(fixed))
    metrics = retrain(lm, config, progress=False)
    after = _loss(lm.model, windows)
    assert after < before - 0.3, (before, after)
    assert metrics["losses"][-1] < metrics["losses"][0]
    assert metrics["mask_held"]


def test_steps_are_honoured_exactly(corpus) -> None:
    lm = load_model("tiny:qwen2")
    prune_rows(lm.model)
    config = PerpConfig(steps=7, batch_size=2, grad_accum=3, seq_len=16, corpus=corpus)
    metrics = retrain(lm, config, progress=False)
    assert len(metrics["losses"]) == 7
    assert metrics["optimizer_steps"] == 7  # read from AdamW's own step counter


def test_trainable_count_matches_a_hand_count_for_opt() -> None:
    """Tiny OPT: hidden 64, ffn 128, 2 blocks, every linear and LayerNorm has a bias."""
    model = load_model("tiny:opt").model
    total = parameter_counts(model)[1]
    add_adapters(model, "maskl", rank=4)
    trainable = select_trainable(model, ("bias", "norm", "lora"))
    h, f = 64, 128
    linear_biases = 4 * h + f + h  # q, k, v, out, fc1, fc2
    norms = 2 * (2 * h)  # two LayerNorms per block, weight + bias
    lora = 4 * 4 * (h + h) + 4 * (h + f) + 4 * (f + h)  # r * (in + out) per linear
    per_block = linear_biases + norms + lora
    final_norm = 2 * h
    expected = 2 * per_block + final_norm
    assert sum(p.numel() for p in trainable.values()) == expected == 8704
    assert parameter_counts(model) == (expected, total + 2 * lora)


def test_training_the_head_unties_it_from_the_embedding_and_reloads(corpus, tmp_path) -> None:
    lm = load_model("tiny:gpt2")  # GPT-2 ties lm_head to wte
    prune_rows(lm.model)
    embedding = Anatomy.of(lm.model).embed.weight.detach().clone()
    config = PerpConfig(params=("head", "lora"), corpus=corpus, **QUICK)
    metrics = retrain(lm, config, progress=False)
    anatomy = Anatomy.of(lm.model)
    assert metrics["head_untied"] and anatomy.lm_head.weight is not anatomy.embed.weight
    assert torch.equal(anatomy.embed.weight, embedding)  # the embedding did not train
    assert not torch.equal(anatomy.lm_head.weight, embedding)  # the head did
    head = 320 * 64
    lora = 2 * (4 * (64 + 192) + 4 * (64 + 64) + 4 * (64 + 256) + 4 * (256 + 64))
    assert metrics["trainable_parameters"] == head + lora
    assert metrics["total_parameters"] == 136960 + head + lora
    assert metrics["trainable_share"] == (head + lora) / (136960 + head + lora)
    _assert_reloads(lm, tmp_path)


def _assert_reloads(lm, folder) -> None:
    lm.model.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = random_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, lm.model(ids).logits)
    assert _same_masks(masks_of(lm.model), masks_of(reloaded))
    assert type(reloaded) is type(lm.model) and _no_adapters(reloaded)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_merged_model_saves_and_reloads_as_a_plain_hf_model(corpus, tmp_path, family) -> None:
    lm = load_model(f"tiny:{family}")
    prune_rows(lm.model)
    retrain(lm, PerpConfig(lora="scalel", corpus=corpus, **QUICK), progress=False)
    _assert_reloads(lm, tmp_path)
    assert sparsity_report(AutoModelForCausalLM.from_pretrained(tmp_path))[
        "total"
    ] == pytest.approx(0.5)


def test_a_nan_loss_raises_with_the_step_number(corpus) -> None:
    lm = load_model("tiny:llama")
    prune_rows(lm.model)
    with torch.no_grad():
        Anatomy.of(lm.model).final_norm.weight[0] = float("nan")
    with pytest.raises(OptlabError, match="nan at step 1"):
        retrain(lm, PerpConfig(corpus=corpus, **QUICK), progress=False)
    assert _no_adapters(lm.model)  # the model is left merged, not half-wrapped


def test_reconstruction_brings_blocks_closer_to_the_dense_ones(tiny, corpus) -> None:
    dense = copy.deepcopy(tiny)
    prune_rows(tiny.model)
    before = masks_of(tiny.model)
    # No biases here: in a tiny random post-norm block (OPT-350m) the pre-norm activations
    # are so small that one Adam step on a bias overshoots. Real models are not this fragile.
    config = PerpConfig(
        method="reconstruct", params=("norm", "lora"), steps=10, windows=4, batch_size=2,
        seq_len=32, rank=4, alpha=8.0, lr=2e-3, corpus=corpus,
    )  # fmt: skip
    metrics = retrain(tiny, config, dense=dense, progress=False)
    assert [b["block"] for b in metrics["block_mse"]] == [0, 1]
    for block in metrics["block_mse"]:
        assert block["after"] < 0.8 * block["before"], block
    assert len(metrics["losses"]) == 2 * 10
    assert metrics["mask_held"] and _same_masks(before, masks_of(tiny.model))
    assert _no_adapters(tiny.model)


def test_bf16_model_trains_fp32_subsets_and_comes_back_bf16(corpus) -> None:
    lm = load_model("tiny:llama", dtype="bfloat16")
    prune_rows(lm.model)
    metrics = retrain(lm, PerpConfig(corpus=corpus, **QUICK), progress=False)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert metrics["mask_held"] and all(math.isfinite(x) for x in metrics["losses"])
    assert all(p.requires_grad for p in lm.model.parameters())  # as loaded


def test_untie_head_is_a_no_op_on_untied_models() -> None:
    model = load_model("tiny:llama").model
    assert not untie_head(model)
    tied = load_model("tiny:opt").model
    assert untie_head(tied) and tied.config.tie_word_embeddings is False


def test_config_validation() -> None:
    assert PerpConfig(params="bias, norm,bias").params == ("bias", "norm")
    assert PerpConfig(params=["lora"]).params == ("lora",)  # lists come from YAML
    with pytest.raises(OptlabError, match="Did you mean 'norm'"):
        PerpConfig(params=("bias", "norms"))
    with pytest.raises(OptlabError, match="Did you mean 'scalel'"):
        PerpConfig(lora="scale")
    with pytest.raises(OptlabError, match="retraining method"):
        PerpConfig(method="fulll")
    with pytest.raises(OptlabError, match="steps"):
        PerpConfig(steps=0)
    with pytest.raises(OptlabError, match="empty"):
        PerpConfig(params=())
    with pytest.raises(OptlabError, match="head"):
        PerpConfig(method="reconstruct", params=("head",))
    with pytest.raises(OptlabError, match="dense model"):
        retrain(load_model("tiny:llama"), PerpConfig(method="reconstruct"), progress=False)
