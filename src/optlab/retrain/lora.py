"""LoRA adapters for pruned linears that can keep the sparsity mask exact.

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

Adapters are fp32 whatever the model's dtype; the base weight is frozen (its bias may still
train, see ``perp.select_trainable``). GPT-2's ``Conv1D`` stores its weight as (in x out):
:func:`~optlab.core.anatomy.weight_matrix` gives the (out x in) view once, and everything
here works on that view.

>>> add_adapters(model, "maskl", rank=16, alpha=32.0)   # wraps every block linear
>>> ...train the adapters...
>>> merge_adapters(model)                                # plain nn.Linear / Conv1D again
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.errors import OptlabError, did_you_mean

VARIANTS = ("plain", "prune", "maskl", "scalel")


class LoraLinear(nn.Module):
    """A frozen (pruned) linear plus a rank-``rank`` adapter of one of :data:`VARIANTS`.

    ``base`` is kept as a submodule, untouched except for being frozen, so that
    :meth:`merge` can write the merged weight into it and hand it back.

    >>> layer = LoraLinear(nn.Linear(64, 32), "maskl", rank=4, alpha=8.0)
    >>> layer(torch.randn(2, 64)).shape
    torch.Size([2, 32])
    """

    def __init__(
        self,
        base: nn.Module,
        variant: str = "maskl",
        rank: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise did_you_mean("LoRA variant", variant, VARIANTS)
        if rank < 1:
            raise OptlabError(f"LoRA rank must be at least 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise OptlabError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if variant == "scalel" and dropout:
            raise OptlabError("ScaleLoRA multiplies the weight: input dropout has no meaning")
        weight = weight_matrix(base)  # raises TypeError for anything but Linear / Conv1D
        out_features, in_features = weight.shape
        base.weight.requires_grad_(False)
        self.base = base
        self.variant = variant
        self.rank = rank
        # ScaleLoRA multiplies: an alpha/r factor would only rescale the identity init.
        self.scale = 1.0 if variant == "scalel" else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        # Not persistent: the mask is derived from the weights, never saved separately.
        self.register_buffer("mask", weight != 0, persistent=False)
        device = weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.variant == "scalel":
            nn.init.constant_(self.lora_A, 1 / math.sqrt(self.rank))
            nn.init.constant_(self.lora_B, 1 / math.sqrt(self.rank))
        else:  # the usual LoRA start: BA = 0, so the wrapped layer starts as the pruned one
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
        """The fp32 (out x in) update the merge adds (for ``scalel``: the factor it multiplies)."""
        product = self.lora_B @ self.lora_A
        if self.variant in ("prune", "maskl"):
            product = product * self.mask
        return product if self.variant == "scalel" else self.scale * product

    def merged_weight(self) -> torch.Tensor:
        """The (out x in) weight :meth:`merge` writes, in fp32."""
        weight = self.weight.float()
        if self.variant == "scalel":
            return weight * self.delta()  # zeros stay zero: 0 * anything = 0
        return weight + self.delta()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant in ("plain", "prune"):
            # Low rank path: (x Aᵀ) Bᵀ never builds the (out x in) product.
            adapter_input = self.dropout(x).to(self.lora_A.dtype)
            low_rank = F.linear(F.linear(adapter_input, self.lora_A), self.lora_B)
            return self.base(x) + (self.scale * low_rank).to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.variant == "maskl" and self.training and isinstance(self.dropout, nn.Dropout):
            # Dropout applies to the adapter's input only, so the two paths stay separate.
            out = F.linear(x, self.weight.to(x.dtype), bias)
            return out + F.linear(self.dropout(x), self.delta().to(x.dtype))
        # One matmul with the effective weight: what the merged layer will compute.
        return F.linear(x, self.merged_weight().to(x.dtype), bias)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Write the merged weight into the base module and return it (plain Linear/Conv1D)."""
        target = self.weight  # a view sharing storage with base.weight, whatever its layout
        target.copy_(self.merged_weight().to(target.dtype))
        return self.base

    def extra_repr(self) -> str:
        out_features, in_features = self.mask.shape
        return f"{self.variant}, in={in_features}, out={out_features}, rank={self.rank}"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def add_adapters(
    model: nn.Module,
    variant: str = "maskl",
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
) -> dict[str, LoraLinear]:
    """Wrap every block linear of ``model`` in a :class:`LoraLinear`; return them by name.

    The mask of each is taken from its current weights, so call this on the pruned model.

    >>> adapters = add_adapters(lm.model, "scalel", rank=16)
    >>> list(adapters)[0]
    'model.layers.0.self_attn.q_proj'
    """
    if adapters_of(model):
        raise OptlabError("the model already has LoRA adapters; merge_adapters() them first")
    anatomy = Anatomy.of(model)
    wrapped: dict[str, LoraLinear] = {}
    for index, block in enumerate(anatomy.blocks):
        for name, linear in anatomy.linears(block).items():
            adapter = LoraLinear(linear, variant, rank, alpha, dropout)
            _set_submodule(block, name, adapter)
            wrapped[f"{anatomy.blocks_path}.{index}.{name}"] = adapter
    return wrapped


def adapters_of(model: nn.Module) -> dict[str, LoraLinear]:
    """The :class:`LoraLinear` modules of ``model`` by dotted name."""
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
        _set_submodule(model, name, adapter.merge())
    return len(adapters)
