import pytest
from torch import nn

from optlab.core.models import load_model
from optlab.core.modules import replace_module


def test_replace_module_puts_the_new_module_in_its_real_parent() -> None:
    model = load_model("tiny:llama").model
    name = "model.layers.1.self_attn.q_proj"
    old, new = model.get_submodule(name), nn.Identity()
    assert replace_module(model, name, new) is old
    assert model.get_submodule(name) is new
    assert name not in vars(model) and not hasattr(model, name)  # no stray root attribute


def test_replace_module_at_the_top_level_and_under_a_block() -> None:
    root = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    replace_module(root, "0", nn.ReLU())
    replace_module(root[1], "0", nn.Tanh())  # a name relative to the module given
    assert isinstance(root[0], nn.ReLU) and isinstance(root.get_submodule("1.0"), nn.Tanh)


def test_replace_module_refuses_a_name_that_is_not_there() -> None:
    root = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(AttributeError):
        replace_module(root, "0.nope", nn.ReLU())
    with pytest.raises(AttributeError):
        replace_module(root, "missing.child", nn.ReLU())
