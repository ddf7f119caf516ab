import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.models import load_model
from optlab.errors import OptlabError
from optlab.pruning.masks import masks_of, sparsity_report
from optlab.retraining.lora import adapters_of, add_adapters, make_adapter, merge_adapters
from tests.conftest import random_ids
from tests.retraining.conftest import is_2_4, prune_2_4, prune_rows

IDS = random_ids(2, 16)


@torch.no_grad()
def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Move the adapters away from their init, as training would, so merges do something."""
    gen = torch.Generator().manual_seed(seed)
    for adapter in adapters_of(model).values():
        for param in (adapter.lora_A, adapter.lora_B):
            noise = torch.randn(param.shape, generator=gen)
            if adapter.variant == "scalel":
                param.add_(0.05 * noise)
            else:
                param.copy_(0.1 * noise)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("variant", ["maskl", "prune", "scalel"])
@pytest.mark.parametrize("prune", [prune_rows, prune_2_4], ids=["rows50", "2:4"])
def test_merge_keeps_the_zero_set_exactly(tiny, variant, prune) -> None:
    prune(tiny.model)
    before = masks_of(tiny.model)
    add_adapters(tiny.model, variant, rank=4, alpha=8.0)
    _randomize(tiny.model)
    merge_adapters(tiny.model)
    after = masks_of(tiny.model)
    assert before.keys() == after.keys()
    for name, mask in before.items():
        assert torch.equal(mask, after[name]), name
    if prune is prune_2_4:
        anatomy = Anatomy.of(tiny.model)
        assert all(
            is_2_4(weight_matrix(m)) for b in anatomy.blocks for m in anatomy.linears(b).values()
        )


def test_plain_lora_merges_densely_and_loses_the_sparsity() -> None:
    """The documented baseline behaviour: the standard LoRA merge, pruned zeros filled in."""
    model = load_model("tiny:llama").model
    prune_rows(model)
    add_adapters(model, "plain", rank=4, alpha=8.0)
    _randomize(model)
    wrapped = _logits(model)
    merge_adapters(model)
    assert sparsity_report(model)["total"] < 0.01  # was 0.5
    torch.testing.assert_close(_logits(model), wrapped, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["plain", "maskl", "scalel"])
def test_merged_model_computes_what_the_wrapped_model_computed(tiny, variant) -> None:
    prune_rows(tiny.model)
    add_adapters(tiny.model, variant, rank=4, alpha=8.0)
    _randomize(tiny.model)
    wrapped = _logits(tiny.model)
    merge_adapters(tiny.model)
    torch.testing.assert_close(_logits(tiny.model), wrapped, atol=1e-5, rtol=0)


def test_lora_prune_merges_the_masked_update_not_what_it_trained() -> None:
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight[:, ::2] = 0
    weight = linear.weight.detach().clone()
    adapter = make_adapter(linear, "prune", rank=4, alpha=8.0)
    nn.init.normal_(adapter.lora_B)
    x = torch.randn(3, 16)
    with torch.no_grad():
        trained = adapter(x)
        update = 2.0 * adapter.lora_B @ adapter.lora_A
        torch.testing.assert_close(trained, x @ (weight + update).T + linear.bias)
        merged = adapter.merge()
    torch.testing.assert_close(merged.weight, weight + update * (weight != 0))
    assert (merged.weight[:, ::2] == 0).all()


def test_scalelora_is_the_identity_at_init(tiny) -> None:
    prune_rows(tiny.model)
    expected = _logits(tiny.model)
    adapters = add_adapters(tiny.model, "scalel", rank=16)
    for adapter in adapters.values():
        assert (adapter.lora_A == 1 / math.sqrt(16)).all()
        assert torch.equal(adapter.delta(), torch.ones_like(adapter.delta()))
    torch.testing.assert_close(_logits(tiny.model), expected, atol=1e-6, rtol=0)


def test_maskl_starts_as_the_pruned_layer_with_standard_init() -> None:
    model = load_model("tiny:qwen2").model
    prune_rows(model)
    expected = _logits(model)
    for adapter in add_adapters(model, "maskl", rank=4).values():
        assert (adapter.lora_B == 0).all() and adapter.lora_A.abs().sum() > 0
    torch.testing.assert_close(_logits(model), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_maskl_forward_is_w_plus_scaled_masked_ba(kind) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 6) if kind == "linear" else Conv1D(nf=6, nx=12)
    nn.init.normal_(base.bias)
    prune_weight = weight_matrix(base)
    prune_weight[torch.rand(prune_weight.shape) < 0.5] = 0
    weight = prune_weight.clone()  # (out, in) whatever the storage layout
    adapter = make_adapter(base, "maskl", rank=3, alpha=6.0)
    nn.init.normal_(adapter.lora_B)
    x = torch.randn(2, 5, 12)
    expected = x @ (weight + 2.0 * (adapter.lora_B @ adapter.lora_A) * (weight != 0)).T + base.bias
    torch.testing.assert_close(adapter(x), expected)
    assert adapter(x).requires_grad and not base.weight.requires_grad


def test_merge_restores_the_original_modules_and_state_dict() -> None:
    model = load_model("tiny:gpt2").model
    types = {name: type(m) for name, m in model.named_modules()}
    keys = set(model.state_dict())
    assert len(add_adapters(model, "maskl", rank=4)) == 2 * 4
    assert merge_adapters(model) == 8
    assert {name: type(m) for name, m in model.named_modules()} == types
    assert set(model.state_dict()) == keys
    assert not adapters_of(model)


def test_adapters_are_fp32_on_a_bf16_model_and_the_base_is_frozen() -> None:
    model = load_model("tiny:llama", dtype="bfloat16").model
    prune_rows(model)
    adapters = add_adapters(model, "maskl", rank=4)
    for adapter in adapters.values():
        assert adapter.lora_A.dtype == adapter.lora_B.dtype == torch.float32
        assert not adapter.base.weight.requires_grad
    with torch.no_grad():
        assert model(IDS).logits.dtype == torch.bfloat16


def test_bad_variants_and_double_wrapping_are_refused() -> None:
    model = load_model("tiny:llama").model
    with pytest.raises(OptlabError, match="Did you mean 'maskl'"):
        add_adapters(model, "mask")
    with pytest.raises(OptlabError, match="dropout"):
        make_adapter(nn.Linear(4, 4), "scalel", rank=2, dropout=0.1)
    add_adapters(model, "maskl", rank=2)
    with pytest.raises(OptlabError, match="already has LoRA adapters"):
        add_adapters(model, "maskl", rank=2)


def test_maskl_dropout_drops_only_the_adapter_input() -> None:
    base = nn.Linear(8, 4)
    with torch.no_grad():
        base.weight[:, 1::2] = 0
    weight = base.weight.detach().clone()
    adapter = make_adapter(base, "maskl", rank=2, alpha=4.0, dropout=0.5)
    nn.init.normal_(adapter.lora_B)
    delta = 2.0 * (adapter.lora_B @ adapter.lora_A) * (weight != 0)
    x = torch.randn(3, 8)
    with torch.no_grad():
        adapter.eval()
        torch.testing.assert_close(adapter(x), F.linear(x, weight + delta, base.bias))
        adapter.train()
        torch.manual_seed(1)
        trained = adapter(x)
        torch.manual_seed(1)
        dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(trained, F.linear(x, weight, base.bias) + F.linear(dropped, delta))
