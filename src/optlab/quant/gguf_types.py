"""The GGUF tensor types optlab writes, their true sizes, and how a weight becomes one.

Sizes come from gguf-py's ``GGML_QUANT_SIZES`` (elements per block, bytes per block), so bits
per weight include every block's scale (and minimum): Q8_0 8.5, Q5_1 6, Q5_0 5.5, Q4_1 5,
Q4_0 4.5. Encoding is gguf-py's own reference rounding (``gguf.quants.quantize``), the one
llama.cpp's ``convert_hf_to_gguf.py`` writes. gguf-py can dequantize the K-quants (Q4_K, ...)
but not write them, so they are not offered.

optlab's asymmetric b-bit codes (w_hat = (q - z) s, fp16 s, per groups of a multiple of 32
columns) map *exactly* onto Q4_1 blocks for b <= 4: d = s, m = -z s (the only rounding is m
to fp16), q unchanged (:func:`q4_1_from_codes`).

>>> blocks = encode(weight, "q4_1")          # uint8 [rows, cols / 32 * 20]
>>> bits_per_weight("q4_1")
5.0
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from optlab.errors import OptlabError

TYPES: dict[str, GGMLQuantizationType] = {
    name: GGMLQuantizationType[name.upper()]
    for name in ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
}
# The quantized ladder the allocator picks from, widest first (F16 may be added by name).
LADDER = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
NAMES = {qtype: name for name, qtype in TYPES.items()}


def gguf_type(name: str) -> GGMLQuantizationType:
    key = name.lower()
    if key not in TYPES:
        raise OptlabError(f"unknown GGUF type {name!r}; optlab writes {', '.join(TYPES)} "
                          "(gguf-py cannot write the K-quants)")  # fmt: skip
    return TYPES[key]


def block_size(name: str) -> int:
    return GGML_QUANT_SIZES[gguf_type(name)][0]


def bits_per_weight(name: str) -> float:
    """Stored bits per element, the block's scale (and minimum) included."""
    block, size = GGML_QUANT_SIZES[gguf_type(name)]
    return 8 * size / block


def fits(name: str, columns: int) -> bool:
    """Whether rows of ``columns`` elements split into whole blocks of type ``name``."""
    return columns % block_size(name) == 0


def tensor_bytes(shape: tuple[int, ...], name: str) -> int:
    """Bytes of a tensor of ``shape`` (rows last-dimension contiguous) stored as ``name``."""
    block, size = GGML_QUANT_SIZES[gguf_type(name)]
    count = int(np.prod(shape))
    if shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} do not split into {name} blocks of {block}")
    return count // block * size


def encode(weight: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """``weight`` (any float tensor, rows along the last dimension) in type ``name``: a float
    array for F32/F16, else uint8 blocks [..., row bytes] (BF16 included, as gguf-py does)."""
    data = weight.detach().float().cpu().numpy() if isinstance(weight, torch.Tensor) else weight
    return gguf_quants.quantize(np.ascontiguousarray(data, dtype=np.float32), gguf_type(name))


def decode(data: np.ndarray, name: str) -> np.ndarray:
    """The float32 values of ``data`` in type ``name`` (what every GGUF reader computes)."""
    return gguf_quants.dequantize(data, gguf_type(name)).astype(np.float32, copy=False)


def q4_1_from_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> np.ndarray:
    """Q4_1 blocks holding optlab's asymmetric codes (< 16) unchanged: per block of 32 columns
    d = s and m = -z s of the group it lies in. ``group_size`` must be a multiple of 32
    (each block then lies in one group) and the row length too."""
    rows, cols = codes.shape
    if group_size % 32 or cols % 32:
        raise ValueError(f"Q4_1 blocks of 32 need groups ({group_size}) and rows ({cols}) "
                         "in multiples of 32")  # fmt: skip
    if int(codes.max()) > 15:
        raise ValueError("codes above 15 do not fit a Q4_1 nibble")
    blocks = cols // 32
    group = torch.arange(blocks) * 32 // group_size  # the group of each block
    scale = scales.float()[:, group]
    minimum = -zeros.float()[:, group] * scale  # exact in fp32; rounded once, to fp16, here
    q = codes.to(torch.uint8).reshape(rows, blocks, 32)
    # A Q4_1 block packs element j in the low nibble and element j + 16 in the high one.
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    d = scale.half().numpy().view(np.uint8).reshape(rows, blocks, 2)
    m = minimum.half().numpy().view(np.uint8).reshape(rows, blocks, 2)
    packed = np.concatenate([d, m, nibbles.numpy()], axis=-1)
    return np.ascontiguousarray(packed.reshape(rows, blocks * 20))


def exact_type(bits: int, group_size: int, columns: int) -> str | None:
    """The GGUF type that holds optlab's ``bits``-bit codes exactly, if one does."""
    if bits <= 4 and group_size % 32 == 0 and columns % 32 == 0:
        return "q4_1"
    return None


def nearest_type(bits: int) -> str:
    """The GGUF type a ``bits``-bit optlab weight is re-rounded to when no exact one exists."""
    return "q8_0" if bits >= 8 else "q4_1"
