"""``QuantLinear``: a linear layer that holds its weight packed (codes + fp16 scales + uint8
zero points) and computes y = x W_hat^T + b.

Which path a forward takes (:func:`select_kernel`). Measured with torch 2.13 on the idle
2-core development machine (AVX-512), a 1536 x 576 layer, one input row, weights in cache,
one thread / two threads: fp32 ``F.linear`` 0.20 / 0.07 ms.

* ``dequant`` (everywhere, and always for more than ``KERNEL_MAX_ROWS`` rows): unpack and
  rescale the weight, then ``F.linear``. Prefill and scoring take it (~100x faster than a
  weight-only kernel at 4096 rows), and so does an eager decoding step on CPU (1.3-1.5 ms),
  so that eager generation stays exact fp32 arithmetic.
* ``tinygemm`` (a decoding step of 4- or 8-bit layers, groups of 32-256 dividing the row:
  on CUDA eager or compiled, 4 bits, out_features a multiple of 8; on CPU in the compiled
  decoder, out_features a multiple of 16): torch's int4 GEMM, ``aten._weight_int4pack_mm``
  / ``_weight_int4pack_mm_for_cpu``, in bf16: 0.068 / 0.055 ms at 4 bits, 0.09 ms at 8 bits
  on two threads (two nibble halves, :func:`tinygemm_operand`). Fed fp32 the CPU kernel has
  no fast path (3.0 ms on one thread, and 1.8 ms for the 8-bit ``_weight_int8pack_mm``): the
  input goes in as bf16, so a step differs from the exact one by bf16 rounding (~4e-3 of
  the largest output). Layers whose ``kernel`` is ``"fp32"``
  never take it: the LM head, whose logits rounded to bf16 tie and flip greedy tokens.
* ``matvec`` (CPU or GPU, inside ``torch.compile``, a few rows, groups dividing the row,
  where tinygemm does not apply): the codes are read at their own width and converted
  inside the compiled graph (what gpt-fast does on GPUs), all in fp32. The layout is the
  transposed one, [blocks, block / k, out] bytes with k codes a byte (4-bit: two, 2-bit:
  four; 3 and 8 bits one), so the generated C++ loop vectorises over output channels and
  reduces over the input without a horizontal sum per group: 0.23 / 0.13 ms for the layer
  above; a 49152 x 576 LM head at 8 bits on two threads 2.2 ms, 3.0 ms with its weights out
  of cache (fp32: 4.3 / 7.6 ms; tinygemm: 2.2 / 2.8 ms). Built by
  :meth:`QuantLinear.prepare_decode` (the compiled decoder calls it) and held beside
  ``packed``, as is tinygemm's layout.

Either kernel's layout holds as many bytes again as ``packed`` at 4 bits. ``kernel =
"dequant"`` forces that path.

>>> layer = QuantLinear.from_quantized(quantize_rtn(linear.weight, 4, 64), bias=linear.bias)
>>> layer.kernel_name(), layer.kernel_name(compiled=True)
('dequant', 'tinygemm')
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from optlab.quant.packing import pack, packed_row_bytes, unpack
from optlab.quant.quantizer import QuantizedWeight, dequantize

INT4_GROUPS = (32, 64, 128, 256)
# A forward of more rows than this dequantizes (prefill, scoring); at most this many take the
# decoding kernels (a decoding step of a batch of up to this many prompts).
KERNEL_MAX_ROWS = 4
# What a layer's ``kernel`` may be set to: "auto", the fastest path; "fp32", never tinygemm's
# bf16 (the LM head: logits rounded to bf16 tie, in steps of 1/8 from 16 to 32, and flip
# greedy tokens); "dequant", always the exact path.
KERNEL_MODES = ("auto", "fp32", "dequant")


def select_kernel(
    bits: int,
    group_size: int,
    in_features: int,
    out_features: int,
    *,
    rows: int,
    device: str,
    compiled: bool,
    bf16: bool = True,
) -> str:
    """The path a forward takes (see the module docstring): 'dequant', 'matvec' or
    'tinygemm' (only with ``bf16``, which a layer whose ``kernel`` is "fp32" turns off).

    >>> select_kernel(4, 64, 576, 1536, rows=1, device="cpu", compiled=True)
    'tinygemm'
    >>> select_kernel(3, 64, 576, 1536, rows=1, device="cpu", compiled=True)
    'matvec'
    >>> select_kernel(4, 64, 576, 1536, rows=1, device="cuda", compiled=False)
    'tinygemm'
    """
    if rows > KERNEL_MAX_ROWS or in_features % group_size:
        return "dequant"
    # (a group of 32-256 dividing the row also gives tinygemm's K tiling: see inner_k_tiles)
    if bf16 and group_size in INT4_GROUPS:
        if bits == 4 and device == "cuda" and out_features % 8 == 0:
            return "tinygemm"
        if bits in (4, 8) and device == "cpu" and compiled and out_features % 16 == 0:
            return "tinygemm"
    if compiled and device in ("cpu", "cuda"):
        return "matvec"
    return "dequant"


def inner_k_tiles(in_features: int) -> int:
    """tinygemm's tiling of the input dimension (tiles of 16 columns): the largest of 8, 4, 2
    that divides it (2 always does for rows of whole groups of 32 or more)."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


def codes_per_byte(bits: int, block: int) -> int:
    """How many codes one byte of the ``matvec`` layout holds (they split a block evenly)."""
    k = 8 // bits if bits in (2, 4) else 1
    return k if block % k == 0 else 1


def matvec_block(group_size: int) -> int:
    """Columns summed before a scale is applied: a group, or a 64-column part of a longer one
    (inductor's loop over a whole 576-column row is 4x slower than over blocks of 64)."""
    block = math.gcd(group_size, 64)
    return block if block >= 16 else group_size


def matvec_layout(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``matvec`` kernel's tensors from codes [out, in]: bytes [blocks, block / k, out]
    (byte j of a block holds codes j, j + block/k, ... in its bit fields, low first), and
    each block's scale s and s * z [blocks, out] in fp32."""
    out, cols = codes.shape
    block = matvec_block(group_size)
    blocks, k = cols // block, codes_per_byte(bits, block)
    by_block = codes.reshape(out, blocks, k, block // k).permute(2, 1, 3, 0)
    packed = by_block[0].clone()
    for j in range(1, k):
        packed |= by_block[j] << (bits * j)
    repeat = group_size // block
    scale = scales.float().T.repeat_interleave(repeat, dim=0).contiguous()
    zero = zeros.float().T.repeat_interleave(repeat, dim=0)
    return packed.contiguous(), scale, (scale * zero).contiguous()


def matvec(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    scaled_zero: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """x [rows, in] times W_hat^T from the ``matvec`` layout, in fp32: per block,
    s * (sum_i q_i x_i) - s z sum_i x_i. Written for inductor, which fuses it into one loop
    that reads each byte once (eager, it is a dozen weight-sized temporaries)."""
    rows = x.shape[0]
    blocks, width, _ = packed.shape
    k = x.shape[1] // (blocks * width)
    xs = x.float().reshape(rows, blocks, k, width, 1)
    if k == 1:
        inner = (packed.float() * xs[:, :, 0]).sum(2)
    else:
        mask = (1 << bits) - 1
        inner = sum(
            (((packed >> (bits * j)) & mask).float() * xs[:, :, j]).sum(2) for j in range(k)
        )
    sums = xs.sum((2, 3))  # [rows, blocks, 1]
    return (inner * scale).sum(1) - (sums * scaled_zero).sum(1)


def tinygemm_pairs(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [out, in] as CUDA's tinygemm takes them: two a byte, the even column high."""
    return (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()


def tinygemm_operand(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit codes [out, k * in], scale s' and offset m' [out, k * groups] whose tinygemm
    product with the input repeated k times is x W_hat^T. tinygemm dequantizes
    (q - 8) s' + m': a 4-bit weight is itself (k = 1) with m' = (8 - z) s; an 8-bit code
    q = 16 h + l is its high nibbles then its low ones (k = 2), since (q - z) s =
    (h - 8) 16s + (136 - z) s + (l - 8) s + 0."""
    s, z = scales.float(), zeros.float()
    if bits == 4:
        return codes, s, (8 - z) * s
    high, low = codes >> 4, codes & 15
    return torch.cat([high, low], 1), torch.cat([16 * s, s], 1), \
        torch.cat([(136 - z) * s, torch.zeros_like(s)], 1)  # fmt: skip


def tinygemm_scales(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """tinygemm's [groups, out, 2] bf16 (scale, offset) from [out, groups] ones."""
    return torch.stack([scale.T, offset.T], dim=-1).to(torch.bfloat16).contiguous()


def tinygemm(
    x: torch.Tensor, weight: torch.Tensor, scale_and_offset: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x [rows, in] times W_hat^T through torch's int4 GEMM (CPU or CUDA) in bf16, from
    :func:`tinygemm_operand`'s weight (in the device's tiled layout) and scales: the input
    is repeated as often as the weight is wider (8-bit weights: twice)."""
    x = x.to(torch.bfloat16)
    repeat = scale_and_offset.shape[0] * group_size // x.shape[-1]
    x = (x.repeat(1, repeat) if repeat > 1 else x).contiguous()
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group_size,
                                                          scale_and_offset)  # fmt: skip
    return torch.ops.aten._weight_int4pack_mm(x, weight, group_size, scale_and_offset)


class QuantLinear(nn.Module):
    """A weight-only quantized linear layer; state: ``packed``, ``scales``, ``zeros``, ``bias``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = -(-in_features // group_size)
        row_bytes = packed_row_bytes(in_features, bits)
        self.register_buffer("packed", torch.zeros(out_features, row_bytes, dtype=torch.uint8,
                                                   device=device))  # fmt: skip
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16,
                                                  device=device))  # fmt: skip
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8,
                                                  device=device))  # fmt: skip
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        )
        self.kernel = "auto"  # one of KERNEL_MODES
        self._cache: dict[str, Any] = {}

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        out_features, in_features = qw.codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        layer = cls(in_features, out_features, qw.bits, qw.group_size, bias is not None,
                    dtype, qw.codes.device)  # fmt: skip
        layer.packed.copy_(pack(qw.codes, qw.bits))
        layer.scales.copy_(qw.scales.half())
        layer.zeros.copy_(qw.zeros)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def codes(self) -> torch.Tensor:
        return unpack(self.packed, self.bits, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat as an (out, in) tensor (the one kept while a ``KeepDequantized`` is open)."""
        kept = self._cache.get(f"dequant:{dtype}")
        if kept is not None:
            return kept
        weight = dequantize(self.codes(), self.scales, self.zeros, self.group_size, dtype)
        if self._cache.get("keep_dequantized"):
            self._cache[f"dequant:{dtype}"] = weight
        return weight

    def keep_weights(self) -> KeepDequantized:
        """A context in which this layer dequantizes its weight once (what the scorer opens
        around its batches, by this name, as it may not import quant)."""
        return KeepDequantized(self)

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, mode: str) -> None:
        # Checked here: a misspelt mode would otherwise act as "auto" without a word.
        if mode not in KERNEL_MODES:
            raise ValueError(f"kernel must be one of {', '.join(KERNEL_MODES)}, not {mode!r}")
        self._kernel = mode

    def kernel_name(self, rows: int = 1, compiled: bool | None = None) -> str:
        """Which path a forward of ``rows`` input rows takes (by default: a one-row decoding
        step's; ``compiled``: inside ``torch.compile``, by default whether it is now)."""
        if self.kernel == "dequant":
            return "dequant"
        if compiled is None:
            compiled = torch.compiler.is_compiling()
        return select_kernel(self.bits, self.group_size, self.in_features, self.out_features,
                             rows=rows, device=self.packed.device.type, compiled=compiled,
                             bf16=self.kernel != "fp32")  # fmt: skip

    def prepare_decode(self) -> None:
        """Build the decoding kernel's layout now, outside a compiled graph (which would
        otherwise rebuild it on every step: until it exists, a compiled forward dequantizes
        instead of taking ``matvec``)."""
        kernel = self.kernel_name(compiled=True)
        if kernel == "tinygemm":
            self._tinygemm()
        elif kernel == "matvec" and "matvec" not in self._cache:
            self._cache["matvec"] = matvec_layout(self.codes(), self.scales, self.zeros,
                                                  self.bits, self.group_size)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel_name(x.numel() // self.in_features)
        prepared = self._cache.get("matvec") if kernel == "matvec" else None
        if kernel == "dequant" or (kernel == "matvec" and prepared is None):
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        flat = x.reshape(-1, self.in_features)
        if kernel == "matvec":
            y = matvec(flat, *prepared, self.bits).to(x.dtype)
        else:
            y = tinygemm(flat, *self._tinygemm(), self.group_size).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _tinygemm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int4 GEMM's weight (in its tiled layout for this device) and scales and
        offsets, built once from the packed state."""
        if "tinygemm" not in self._cache:
            codes, scale, offset = tinygemm_operand(self.codes(), self.scales, self.zeros,
                                                    self.bits)  # fmt: skip
            tiles = inner_k_tiles(codes.shape[1])
            if self.packed.device.type == "cpu":
                weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), tiles)
            else:
                weight = torch.ops.aten._convert_weight_to_int4pack(tinygemm_pairs(codes), tiles)
            self._cache["tinygemm"] = (weight, tinygemm_scales(scale, offset))
        return self._cache["tinygemm"]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        self._cache.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
        )

    def storage_bytes(self) -> int:
        """Bytes of the packed weight, scales and zero points (the bias counts as the rest)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros))


class KeepDequantized:
    """While open, each ``QuantLinear`` of ``model`` dequantizes its weight once and reuses it.

    The dequantizing path unpacks and rescales every weight on every prefill forward; scoring
    many batches (perplexity, multiple choice) repeats that work per batch. Inside this context
    the dequantized weights stay in memory, as large as the unquantized layers, until it
    closes: use it around evaluation loops, not to hold a packed model.

    >>> with KeepDequantized(model):
    ...     scorer.score_tokens(requests)
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        self.opened: list[QuantLinear] = []

    def __enter__(self) -> KeepDequantized:
        # A layer already kept by an enclosing context stays kept until that one closes.
        self.opened = [m for m in self.layers if not m._cache.get("keep_dequantized")]
        for layer in self.opened:
            layer._cache["keep_dequantized"] = True
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.opened:
            for key in [k for k in layer._cache if k.startswith("dequant:")]:
                del layer._cache[key]
            layer._cache.pop("keep_dequantized", None)  # gone if .to() or a load cleared it
        self.opened = []


def quantized_bytes(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Stored bytes of a linear's weight at ``bits`` (16: an fp16 matrix), bias excluded."""
    if bits >= 16:
        return 2 * out_features * in_features
    groups = -(-in_features // group_size)
    return out_features * (packed_row_bytes(in_features, bits) + groups * 3)
