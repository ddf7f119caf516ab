"""Where the parts of a causal LM live, for every supported family, in one table.

Every algorithm reaches blocks, linears, norms and heads through :class:`Anatomy`, so no
algorithm needs a per-architecture copy. GPT-2's ``Conv1D`` (weight stored as in x out) is
handled here once: :func:`weight_matrix` always returns an (out, in) view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from optlab.errors import OptlabError


@dataclass(frozen=True)
class _Layout:
    blocks: str
    embed: str
    final_norm: str
    lm_head: str = "lm_head"
    project_out: str | None = None


_DECODER = _Layout(blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm")

LAYOUTS: dict[str, _Layout] = {
    "opt": _Layout(
        blocks="model.decoder.layers",
        embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        project_out="model.decoder.project_out",
    ),
    "gpt2": _Layout(blocks="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f"),
    "gpt_neox": _Layout(
        blocks="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
    ),
    "llama": _DECODER,
    "qwen2": _DECODER,
    "mistral": _DECODER,
    "gemma3_text": _DECODER,
}

SUPPORTED_FAMILIES = tuple(LAYOUTS)


def _get(model: nn.Module, path: str | None) -> nn.Module | None:
    module: nn.Module | None = model
    for part in (path or "").split("."):
        if not part or module is None:
            break
        module = getattr(module, part, None)
    return module if path else None


class Anatomy:
    """The blocks, embeddings, final norm and head of a causal LM.

    >>> anatomy = Anatomy.of(model)
    >>> anatomy.linears(anatomy.blocks[0])  # {"self_attn.q_proj": Linear, ...}
    """

    def __init__(self, model: nn.Module, family: str, layout: _Layout) -> None:
        self.model = model
        self.family = family
        blocks = _get(model, layout.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise OptlabError(f"{family} model has no decoder blocks at {layout.blocks!r}")
        self.blocks: nn.ModuleList = blocks
        self.blocks_path = layout.blocks
        self.embed: nn.Module = _get(model, layout.embed)  # type: ignore[assignment]
        # OPT-350m has no final norm (post-norm blocks) but projects 1024 -> 512 before the head.
        self.final_norm: nn.Module | None = _get(model, layout.final_norm)
        self.project_out: nn.Module | None = _get(model, layout.project_out)
        self.lm_head: nn.Module = _get(model, layout.lm_head)  # type: ignore[assignment]
        self.logit_softcap: float | None = getattr(model.config, "final_logit_softcapping", None)

    @classmethod
    def of(cls, model: nn.Module) -> Anatomy:
        family = getattr(getattr(model, "config", None), "model_type", None)
        if family not in LAYOUTS:
            raise OptlabError(
                f"unsupported model family {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        return cls(model, family, LAYOUTS[family])

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """The weight matrices of a block by dotted name: ``nn.Linear`` and GPT-2 ``Conv1D``."""
        return {
            name: module
            for name, module in block.named_modules()
            if isinstance(module, nn.Linear | Conv1D)
        }

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the hidden states after the last block (final norm, projection, head)."""
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        logits = self.lm_head(hidden)
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as an (out_features, in_features) tensor sharing storage with the module.

    Writing into it (``weight_matrix(m).mul_(mask)``) edits the module, whatever its type.
    """
    if isinstance(module, Conv1D):
        return module.weight.data.t()
    if isinstance(module, nn.Linear):
        return module.weight.data
    raise TypeError(f"not a linear layer: {type(module).__name__}")
