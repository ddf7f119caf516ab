"""LoRA adapters (Hu et al., 2021) on frozen linears, and merging them back.

A :class:`LoraLinear` wraps a ``Linear`` or GPT-2 ``Conv1D``: the base weight W (out x in) is
frozen, A (rank x in) and B (out x rank) train, and the layer computes W + s·BA with
s = alpha / rank. :func:`merge_adapters` writes every merged weight into its base module and
puts the base back, so the model is a plain Hugging Face model again. Every method that
fine-tunes through adapters (PERP retraining, unlearning) uses this one; variants that change
the update (PERP's masked and multiplicative ones, :mod:`optlab.retraining.lora`) subclass it and
override :meth:`~LoraLinear.delta`, :meth:`~LoraLinear.merged_weight` and ``forward``.

Adapters are fp32 whatever the model's dtype. GPT-2's ``Conv1D`` stores its weight as
(in x out): :func:`~optlab.core.anatomy.weight_matrix` gives the (out x in) view once, and
everything here works on that view.

>>> replace_module(model, name, LoraLinear(model.get_submodule(name), rank=8, alpha=16.0))
>>> ...train the adapters...
>>> merge_adapters(model)                                # plain nn.Linear / Conv1D again
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.modules import replace_module
from optlab.errors import OptlabError


class LoraLinear(nn.Module):
    """A frozen linear plus a rank-``rank`` adapter: W + (alpha / rank)·BA.

    ``base`` is kept as a submodule, untouched except for being frozen, so that
    :meth:`merge` can write the merged weight into it and hand it back.

    >>> layer = LoraLinear(nn.Linear(64, 32), rank=4, alpha=8.0)
    >>> layer(torch.randn(2, 64)).shape
    torch.Size([2, 32])
    """

    variant = "plain"

    def __init__(
        self, base: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if rank < 1:
            raise OptlabError(f"LoRA rank must be at least 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise OptlabError(f"LoRA dropout must be in [0, 1), got {dropout}")
        weight = weight_matrix(base)  # raises TypeError for anything but Linear / Conv1D
        out_features, in_features = weight.shape
        base.weight.requires_grad_(False)
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        device = weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # BA = 0 at the start, so the wrapped layer starts as the base one.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight as (out x in)."""
        return weight_matrix(self.base)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta(self) -> torch.Tensor:
        """The fp32 (out x in) update the merge adds."""
        return self.scale * (self.lora_B @ self.lora_A)

    def merged_weight(self) -> torch.Tensor:
        """The (out x in) weight :meth:`merge` writes, in fp32."""
        return self.weight.float() + self.delta()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Low rank path: (x Aᵀ) Bᵀ never builds the (out x in) product.
        adapter_input = self.dropout(x).to(self.lora_A.dtype)
        low_rank = F.linear(F.linear(adapter_input, self.lora_A), self.lora_B)
        return self.base(x) + (self.scale * low_rank).to(x.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Write the merged weight into the base module and return it (plain Linear/Conv1D)."""
        target = self.weight  # a view sharing storage with base.weight, whatever its layout
        target.copy_(self.merged_weight().to(target.dtype))
        return self.base

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"{self.variant}, in={in_features}, out={out_features}, rank={self.rank}"


def adapters_of(model: nn.Module) -> dict[str, LoraLinear]:
    """The :class:`LoraLinear` modules of ``model`` (any variant) by dotted name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge_adapters(model: nn.Module) -> int:
    """Merge every adapter into its base weight and put the base module back in its place.

    Afterwards the model holds only its original module types, so ``save_pretrained`` writes
    a standard Hugging Face checkpoint. Returns the number of merged layers.

    >>> merge_adapters(lm.model)
    14
    """
    adapters = adapters_of(model)
    for name, adapter in adapters.items():
        replace_module(model, name, adapter.merge())
    return len(adapters)


def wrap_block_linears(
    model: nn.Module, make: Callable[[nn.Module], LoraLinear]
) -> dict[str, LoraLinear]:
    """Wrap every linear of every decoder block (attention and MLP; not the embeddings or
    the LM head) in ``make(linear)``; return the adapters by dotted name.

    >>> adapters = wrap_block_linears(lm.model, lambda linear: LoraLinear(linear, rank=8))
    >>> list(adapters)[0]
    'model.layers.0.self_attn.q_proj'
    """
    if adapters_of(model):
        raise OptlabError("the model already has LoRA adapters; merge_adapters() them first")
    anatomy = Anatomy.of(model)
    wrapped: dict[str, LoraLinear] = {}
    for index, block in enumerate(anatomy.blocks):
        for name, linear in anatomy.linears(block).items():
            adapter = make(linear)
            replace_module(block, name, adapter)
            wrapped[f"{anatomy.blocks_path}.{index}.{name}"] = adapter
    return wrapped
