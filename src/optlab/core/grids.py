"""The value grids of GGUF's legacy block types (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0) in torch: what a
weight becomes once written in one of them and read back, bit for bit what gguf-py's reference
encoder and decoder compute (llama.cpp's ``convert_hf_to_gguf.py`` rounding; tested against
them). A number format, not a method: quantization writes these types, and quantization-aware
unlearning trains through them.

>>> w = torch.randn(8, 64)
>>> bool((round_like(round_like(w, "q4_1"), "q4_1") == round_like(w, "q4_1")).all())
True
"""

from __future__ import annotations

import torch

from optlab.errors import OptlabError, did_you_mean

BLOCK = 32  # elements per block of every type here (gguf-py's GGML_QUANT_SIZES)
# The legacy types as (levels - 1, asymmetric): Q4_1 / Q5_1 keep a block minimum, Q4_0 / Q5_0
# centre a signed grid on zero; Q8_0 is a signed absmax grid of its own.
_LEGACY = {"q4_0": (15, False), "q4_1": (15, True), "q5_0": (31, False), "q5_1": (31, True)}
GRIDS = ("q8_0", *_LEGACY)


def round_like(weight: torch.Tensor, name: str) -> torch.Tensor:
    """``weight`` (rows along the last dimension, a multiple of 32) as type ``name`` stores it:
    the same values as ``decode(encode(weight, name), name)``, computed in torch on the
    weight's device (differentiable nowhere: pair it with a straight-through estimator)."""
    if name not in GRIDS:
        raise did_you_mean("GGUF grid", name, GRIDS)
    if weight.shape[-1] % BLOCK:
        raise OptlabError(f"rows of {weight.shape[-1]} do not split into {name} blocks of "
                          f"{BLOCK}")  # fmt: skip
    shape = weight.shape
    blocks = weight.detach().float().reshape(-1, BLOCK)
    if name == "q8_0":
        d = blocks.abs().amax(-1, keepdim=True) / 127
        inverse = torch.where(d == 0, 0.0, 1 / d)
        scaled = (blocks * inverse).abs()
        # ggml's roundf, as gguf-py writes it: halves away from zero (torch.round goes to
        # even), and no x + 0.5 (that rounds 2.4999999 up in float32).
        whole = torch.floor(scaled)
        q = torch.sign(blocks) * (whole + torch.floor(2 * (scaled - whole)))
        return (d.half().float() * q).reshape(shape).to(weight.dtype)
    top, asymmetric = _LEGACY[name]
    if asymmetric:
        low = blocks.amin(-1, keepdim=True)
        d = (blocks.amax(-1, keepdim=True) - low) / top
        inverse = torch.where(d == 0, 0.0, 1 / d)
        q = torch.trunc((blocks - low) * inverse + 0.5).clamp(0, top)
        return (d.half().float() * q + low.half().float()).reshape(shape).to(weight.dtype)
    # Symmetric: d = (the signed value of largest magnitude) / -(half the levels).
    half = (top + 1) // 2
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    d = extreme / -half
    inverse = torch.where(d == 0, 0.0, 1 / d)
    q = torch.trunc(blocks * inverse + (half + 0.5)).clamp(0, top) - half
    return (d.half().float() * q).reshape(shape).to(weight.dtype)
