"""PERP's LoRA variants for pruned linears, which can keep the sparsity mask exact.

A pruned linear has weight W (out x in) with mask M = 1[W != 0], taken when the adapter is
attached. Four variants (r = rank, s = alpha / r):

============  ==========================  ===============================  ==============
variant       forward while training      merged weight                    mask kept
============  ==========================  ===============================  ==============
``plain``     W + s·BA                    W + s·BA (dense)                 no
``prune``     W + s·BA                    W + s·(BA ⊙ M)                   yes
``maskl``     W + s·(BA ⊙ M)              W + s·(BA ⊙ M)                   yes
``scalel``    W ⊙ BA                      W ⊙ BA                           yes
============  ==========================  ===============================  ==============

``plain`` is the baseline that shows why masking matters: its merge is the standard LoRA
merge and **densifies** the layer (the pruned zeros receive s·BA). We merge it anyway rather
than refuse, so the baseline can be saved and evaluated like the others; ``retrain`` reports
the lost sparsity (``mask_held: False``). ``prune`` trains one function and ships another
(the merge drops the part of BA on pruned weights); ``maskl`` trains exactly what it ships.

``scalel`` (ScaleLoRA) rescales the surviving weights: A and B start at 1/sqrt(r) everywhere
so BA is all ones and the wrapped layer starts as the identity edit. Note that this
initialisation is symmetric (all rows of A equal, all columns of B equal) and gradient
descent keeps it so, so the learnt scale is effectively rank one, u vᵀ; that is the
published method.

``plain`` is :class:`optlab.core.lora.LoraLinear` itself (unlearning uses it too); the other
three subclass it here, as they are PERP's. Adapters are fp32 whatever the model's dtype;
the base weight is frozen (its bias may still train, see ``perp.select_trainable``).

>>> add_adapters(model, "maskl", rank=16, alpha=32.0)   # wraps every block linear
>>> ...train the adapters...
>>> merge_adapters(model)                                # plain nn.Linear / Conv1D again
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from optlab.core.lora import LoraLinear, adapters_of, merge_adapters, wrap_block_linears
from optlab.errors import OptlabError, did_you_mean


class _MaskedLora(LoraLinear):
    """Holds the mask M = 1[W != 0] of the base weight, taken when the adapter is attached."""

    def __init__(
        self, base: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0
    ) -> None:
        super().__init__(base, rank, alpha, dropout)
        # Not persistent: the mask is derived from the weights, never saved separately.
        self.register_buffer("mask", self.weight != 0, persistent=False)

    def delta(self) -> torch.Tensor:
        return super().delta() * self.mask


def _effective_forward(adapter: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """One matmul with the effective weight: what the merged layer will compute."""
    bias = adapter.bias.to(x.dtype) if adapter.bias is not None else None
    return F.linear(x, adapter.merged_weight().to(x.dtype), bias)


class PruneLora(_MaskedLora):
    """LoRA-Prune: trains W + s·BA (the plain forward), merges W + s·(BA ⊙ M)."""

    variant = "prune"


class MaskLora(_MaskedLora):
    """MaskLoRA: trains and merges W + s·(BA ⊙ M), so it trains exactly what it ships."""

    variant = "maskl"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and isinstance(self.dropout, nn.Dropout):
            # Dropout applies to the adapter's input only, so the two paths stay separate.
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            out = F.linear(x, self.weight.to(x.dtype), bias)
            return out + F.linear(self.dropout(x), self.delta().to(x.dtype))
        return _effective_forward(self, x)


class ScaleLora(LoraLinear):
    """ScaleLoRA: W ⊙ BA, with A and B at 1/sqrt(r) everywhere so BA starts as all ones."""

    variant = "scalel"

    def __init__(
        self, base: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0
    ) -> None:
        if dropout:
            raise OptlabError("ScaleLoRA multiplies the weight: input dropout has no meaning")
        super().__init__(base, rank, alpha, dropout)
        # ScaleLoRA multiplies: an alpha/r factor would only rescale the identity init.
        self.scale = 1.0

    def reset_parameters(self) -> None:
        nn.init.constant_(self.lora_A, 1 / math.sqrt(self.rank))
        nn.init.constant_(self.lora_B, 1 / math.sqrt(self.rank))

    def delta(self) -> torch.Tensor:
        """The fp32 (out x in) factor the merge multiplies the weight by."""
        return self.lora_B @ self.lora_A

    def merged_weight(self) -> torch.Tensor:
        return self.weight.float() * self.delta()  # zeros stay zero: 0 * anything = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _effective_forward(self, x)


ADAPTERS: dict[str, type[LoraLinear]] = {
    "plain": LoraLinear, "prune": PruneLora, "maskl": MaskLora, "scalel": ScaleLora,
}  # fmt: skip
VARIANTS = tuple(ADAPTERS)


def make_adapter(
    base: nn.Module,
    variant: str = "maskl",
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
) -> LoraLinear:
    """Wrap ``base`` in the adapter of ``variant`` (one of :data:`VARIANTS`).

    >>> layer = make_adapter(nn.Linear(64, 32), "maskl", rank=4, alpha=8.0)
    >>> layer(torch.randn(2, 64)).shape
    torch.Size([2, 32])
    """
    if variant not in ADAPTERS:
        raise did_you_mean("LoRA variant", variant, ADAPTERS)
    return ADAPTERS[variant](base, rank, alpha, dropout)


def add_adapters(
    model: nn.Module,
    variant: str = "maskl",
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
) -> dict[str, LoraLinear]:
    """Wrap every block linear of ``model`` in an adapter of ``variant``; return them by name.

    The mask of each is taken from its current weights, so call this on the pruned model.

    >>> adapters = add_adapters(lm.model, "scalel", rank=16)
    >>> list(adapters)[0]
    'model.layers.0.self_attn.q_proj'
    """
    return wrap_block_linears(
        model, lambda linear: make_adapter(linear, variant, rank, alpha, dropout)
    )


__all__ = [
    "ADAPTERS",
    "VARIANTS",
    "LoraLinear",
    "MaskLora",
    "PruneLora",
    "ScaleLora",
    "adapters_of",
    "add_adapters",
    "make_adapter",
    "merge_adapters",
]
