"""Optional quantization of the token embeddings and the LM head (``embed_bits``).

In a small model they are a large share of the bytes (SmolLM2-135M: 28M of 135M parameters,
tied), so block linears alone cannot get far below half the FP16 size. The table is quantized
per row (one row per token; groups along the hidden dimension) with the same RTN grid as the
linears. ``QuantEmbedding`` dequantizes only the looked-up rows; a tied LM head becomes a
``QuantLinear`` that shares the very same packed buffers, so the table is stored once.

>>> info = quantize_embeddings(model, bits=8, group_size=128)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from optlab.core.modules import replace_module
from optlab.quant.linear import QuantLinear
from optlab.quant.packing import packed_row_bytes, unpack
from optlab.quant.quantizer import dequantize, quantize_rtn


class QuantEmbedding(nn.Module):
    """Packed embedding table: rows are tokens; ``embed_scale`` kept for Gemma-style models."""

    def __init__(self, num: int, dim: int, bits: int, group_size: int, embed_scale=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num, dim
        self.bits, self.group_size = bits, group_size
        groups = -(-dim // group_size)
        self.register_buffer("packed", torch.zeros(num, packed_row_bytes(dim, bits),
                                                   dtype=torch.uint8))  # fmt: skip
        self.register_buffer("scales", torch.ones(num, groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(num, groups, dtype=torch.uint8))
        if embed_scale is not None:  # Gemma multiplies embeddings by sqrt(hidden)
            self.register_buffer("embed_scale", embed_scale.detach().clone(), persistent=False)
        else:
            self.embed_scale = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        codes = unpack(self.packed[flat], self.bits, self.embedding_dim)
        rows = dequantize(codes, self.scales[flat], self.zeros[flat], self.group_size)
        if self.embed_scale is not None:
            rows = rows * self.embed_scale.to(rows.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def empty_embeddings(model: nn.Module, info: dict[str, Any]) -> None:
    """Swap in empty packed embedding / head modules described by ``info`` (for loading)."""
    old = model.get_submodule(info["input"])
    num, dim = old.weight.shape
    embed = QuantEmbedding(num, dim, info["bits"], info["group_size"],
                           getattr(old, "embed_scale", None))  # fmt: skip
    replace_module(model, info["input"], embed)
    if info["output"] is not None:
        head = model.get_submodule(info["output"])
        layer = QuantLinear(dim, num, info["bits"], info["group_size"], head.bias is not None)
        layer.kernel = "fp32"  # greedy tokens are the argmax of its output: no bf16 ties
        if info["tied"]:
            for key in ("packed", "scales", "zeros"):
                setattr(layer, key, getattr(embed, key))
        replace_module(model, info["output"], layer)


@torch.no_grad()
def quantize_embeddings(model: nn.Module, bits: int, group_size: int | None) -> dict[str, Any]:
    """Quantize the input embeddings and the LM head in place; return their manifest entry."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    qw = quantize_rtn(embed.weight.detach(), bits, group_size)
    info = {
        "input": _name_of(model, embed),
        "output": _name_of(model, head) if head is not None else None,
        "bits": bits,
        "group_size": qw.group_size,
        "tied": tied,
    }
    empty_embeddings(model, info)
    new_embed = model.get_submodule(info["input"])
    new_embed.packed.copy_(QuantLinear.from_quantized(qw).packed)
    new_embed.scales.copy_(qw.scales.half())
    new_embed.zeros.copy_(qw.zeros)
    if head is not None:
        layer = model.get_submodule(info["output"])
        if not tied:
            head_qw = quantize_rtn(head.weight.detach(), bits, group_size)
            fresh = QuantLinear.from_quantized(head_qw)
            for key in ("packed", "scales", "zeros"):
                getattr(layer, key).copy_(getattr(fresh, key))
        if head.bias is not None:
            layer.bias.data.copy_(head.bias)
    return info
