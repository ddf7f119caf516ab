"""Swap a submodule by its dotted name: the one place quantization, LoRA and loading do it.

``setattr(model, "a.b.c", new)`` would only add an unused attribute to the root; the new
module has to go into its real parent.
"""

from __future__ import annotations

from torch import nn


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted ``name`` under ``root`` and return the module it replaced.

    >>> replace_module(model, "model.layers.0.self_attn.q_proj", QuantLinear(...))
    """
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)  # AttributeError for a name that is not there
    setattr(parent, child, new)
    return old
