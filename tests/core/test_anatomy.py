import pytest
import torch
from transformers import BertConfig, BertModel
from transformers.pytorch_utils import Conv1D

from optlab.core.anatomy import SUPPORTED_FAMILIES, Anatomy, weight_matrix
from optlab.core.models import load_model
from optlab.errors import OptlabError
from tests.conftest import random_ids

EXPECTED_LINEARS = {
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
            "fc1", "fc2"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "gpt_neox": {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                 "mlp.dense_4h_to_h"},
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
}  # fmt: skip
for _family in ("qwen2", "mistral", "gemma3_text"):
    EXPECTED_LINEARS[_family] = EXPECTED_LINEARS["llama"]
EXPECTED_LINEARS["opt-350m"] = EXPECTED_LINEARS["opt"]


def test_parts_of_every_family(tiny) -> None:
    anatomy = Anatomy.of(tiny.model)
    assert len(anatomy.blocks) == 2
    assert anatomy.embed.weight.shape[0] == tiny.model.config.vocab_size
    linears = anatomy.linears(anatomy.blocks[0])
    family = tiny.family if tiny.family != "opt" or anatomy.final_norm else "opt-350m"
    assert set(linears) == EXPECTED_LINEARS[family]
    for module in linears.values():
        out_features, in_features = weight_matrix(module).shape
        x = torch.randn(3, in_features)
        assert module(x).shape == (3, out_features)


def test_logits_from_last_hidden_state_match_the_model(tiny) -> None:
    ids = random_ids(2, 12)
    with torch.no_grad():
        out = tiny.model(ids, output_hidden_states=True)
        anatomy = Anatomy.of(tiny.model)
        # hidden_states[-1] already has the final norm in most families; recompute it instead.
        captured = {}
        anatomy.blocks[-1].register_forward_hook(
            lambda m, a, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o)
        )
        tiny.model(ids)
        torch.testing.assert_close(anatomy.logits(captured["h"]), out.logits)


def test_opt_350m_quirks() -> None:
    anatomy = Anatomy.of(load_model("tiny:opt-350m").model)
    assert anatomy.final_norm is None  # post-norm blocks
    assert anatomy.project_out is not None and anatomy.project_out.out_features == 32


def test_conv1d_weight_matrix_is_an_out_by_in_view_that_edits_the_module() -> None:
    module = Conv1D(nf=6, nx=4)  # GPT-2 stores weight as (in=4, out=6)
    matrix = weight_matrix(module)
    assert matrix.shape == (6, 4)
    x = torch.randn(2, 4)
    torch.testing.assert_close(module(x), x @ matrix.T + module.bias)
    matrix[:, 0] = 0  # zero input feature 0 through the view
    assert torch.all(module.weight[0] == 0)


def test_unsupported_family_lists_the_supported_ones() -> None:
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=37, vocab_size=50))  # fmt: skip
    with pytest.raises(OptlabError, match="unsupported model family 'bert'") as err:
        Anatomy.of(model)
    for family in SUPPORTED_FAMILIES:
        assert family in str(err.value)
