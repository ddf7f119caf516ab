"""``QuantLinear``: a linear layer that holds its weight packed (codes + fp16 scales + uint8
zero points) and computes y = x W_hat^T + b.

Where torch ships a CPU weight-only kernel for the configuration it is used:

* 8 bits, per output channel: ``aten._weight_int8pack_mm``. It is symmetric, so the codes are
  shifted to int8 (q - 128) and the zero point becomes a per-row offset:
  x (q - z)^T s = int8mm(x, q - 128, s) + sum(x) * (128 - z) s.
* 4 bits, groups of 32/64/128/256 dividing in_features, out_features a multiple of 16:
  ``aten._weight_int4pack_mm_for_cpu``, whose dequantization is (q - 8) * s + m, so
  m = (8 - z) * s.

Everything else (2/3 bits, grouped 8-bit, other shapes, other devices) unpacks and
dequantizes the weight, then calls ``F.linear``. ``kernel = "dequant"`` forces that path.

>>> layer = QuantLinear.from_quantized(quantize_rtn(linear.weight, 4), bias=linear.bias)
>>> layer.kernel_name()   # 'int4pack' or 'dequant'
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from optlab.quant.packing import pack, packed_row_bytes, unpack
from optlab.quant.quantizer import QuantizedWeight, dequantize

INT4_GROUPS = (32, 64, 128, 256)
# torch's weight-only int8/int4 CPU kernels cost milliseconds per input row (torch 2.13): they
# win for decoding a few rows, while prefill and scoring are ~100x faster dequantized (measured
# with a 1536 x 576 layer at 4096 rows: 20 s vs 0.13 s at 4 bits).
KERNEL_MAX_ROWS = 4


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
        self.kernel = "auto"
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

    def kernel_name(self, rows: int = 1) -> str:
        """Which path a forward of ``rows`` input rows takes: 'int8pack', 'int4pack' or
        'dequant' (by default: a one-row decoding step's)."""
        if self.kernel == "dequant" or self.packed.device.type != "cpu" or rows > KERNEL_MAX_ROWS:
            return "dequant"
        if self.bits == 8 and self.group_size == self.in_features:
            return "int8pack"
        if (
            self.bits == 4
            and self.group_size in INT4_GROUPS
            and self.in_features % self.group_size == 0
            and self.out_features % 16 == 0
        ):
            return "int4pack"
        return "dequant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel_name(x.numel() // self.in_features)
        if kernel == "dequant":
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        flat = x.reshape(-1, self.in_features).contiguous()
        prepared = self._prepare(kernel, x.dtype)
        if kernel == "int8pack":
            weight, scale, offset = prepared
            y = torch.ops.aten._weight_int8pack_mm(flat, weight, scale)
            y = y + flat.sum(-1, keepdim=True) * offset
        else:
            weight, scale_and_zero = prepared
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, weight, self.group_size, scale_and_zero
            )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _prepare(self, kernel: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Kernel-layout weights, built once from the packed state (not saved)."""
        key = f"{kernel}:{dtype}"
        if key not in self._cache:
            codes, scale = self.codes(), self.scales.to(dtype)
            zero = self.zeros.to(dtype)
            if kernel == "int8pack":
                weight = (codes.to(torch.int16) - 128).to(torch.int8)
                self._cache[key] = (weight, scale[:, 0], ((128 - zero) * scale)[:, 0])
            else:
                weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    codes.to(torch.int32), 1
                )
                scale_and_zero = torch.stack([scale.T, ((8 - zero) * scale).T], dim=-1)
                self._cache[key] = (weight, scale_and_zero.contiguous())
        return self._cache[key]

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
