import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from optlab.core.anatomy import weight_matrix
from optlab.core.lora import LoraLinear, adapters_of, merge_adapters
from optlab.core.modules import replace_module
from optlab.errors import OptlabError


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_lora_computes_w_plus_scaled_ba_and_merges_into_the_base(kind) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 6) if kind == "linear" else Conv1D(nf=6, nx=12)
    weight = weight_matrix(base).detach().clone()
    model = nn.Sequential(base)
    adapter = LoraLinear(base, rank=3, alpha=6.0)
    replace_module(model, "0", adapter)
    assert (adapter.lora_B == 0).all() and not base.weight.requires_grad
    nn.init.normal_(adapter.lora_B)
    x = torch.randn(2, 5, 12)
    expected = x @ (weight + 2.0 * adapter.lora_B @ adapter.lora_A).T + base.bias
    torch.testing.assert_close(model(x), expected)
    assert list(adapters_of(model)) == ["0"]
    assert merge_adapters(model) == 1
    assert model[0] is base and not adapters_of(model)
    torch.testing.assert_close(model(x), expected.detach(), atol=1e-5, rtol=0)


def test_lora_refuses_bad_ranks_dropouts_and_modules() -> None:
    with pytest.raises(OptlabError, match="rank"):
        LoraLinear(nn.Linear(4, 4), rank=0)
    with pytest.raises(OptlabError, match="dropout"):
        LoraLinear(nn.Linear(4, 4), dropout=1.0)
    with pytest.raises(TypeError):
        LoraLinear(nn.Embedding(4, 4))
