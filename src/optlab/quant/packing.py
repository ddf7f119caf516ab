"""Dense bit packing of unsigned integer codes: 8 values of b bits fill exactly b bytes.

Below 8 bits each row is padded to a multiple of 8 codes, so a row of ``n`` codes takes
``ceil(n / 8) * b`` bytes: 4-bit is two codes per byte (low nibble first), 3-bit eight codes
in three bytes, 2-bit four per byte. 8-bit codes are stored as they are, one per byte.

>>> packed = pack(codes, bits=3)        # codes: uint8 [rows, n], values < 8
>>> torch.equal(unpack(packed, bits=3, count=n), codes)
True
"""

from __future__ import annotations

import torch

WIDTHS = (2, 3, 4, 8)


def packed_row_bytes(count: int, bits: int) -> int:
    """Bytes one packed row of ``count`` codes takes."""
    return count if bits == 8 else -(-count // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes [..., n] (each < 2**bits) into uint8 [..., packed_row_bytes(n)]."""
    if bits not in WIDTHS:
        raise ValueError(f"cannot pack {bits}-bit codes; widths: {WIDTHS}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if bits == 8:
        return codes.contiguous()
    *lead, count = codes.shape
    pad = -count % 8
    codes = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
    if bits in (2, 4):  # byte-aligned: same layout, built in uint8 (much faster)
        per_byte = codes.reshape(*lead, -1, 8 // bits)
        packed = per_byte[..., 0].clone()
        for i in range(1, 8 // bits):
            packed |= per_byte[..., i] << (bits * i)
        return packed
    # Eight codes -> one 8*b-bit word (at most 32 bits for b <= 4) -> b bytes, little-endian.
    octets = codes.reshape(*lead, -1, 8).to(torch.int64)
    shifts = torch.arange(8, device=codes.device) * bits
    words = (octets << shifts).sum(-1, keepdim=True)
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    packed = (words >> byte_shifts) & 0xFF
    return packed.to(torch.uint8).reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 [..., ceil(count/8) * bits] -> uint8 codes [..., count]."""
    if bits not in WIDTHS:
        raise ValueError(f"cannot unpack {bits}-bit codes; widths: {WIDTHS}")
    if bits == 8:
        return packed[..., :count]
    *lead, _ = packed.shape
    if bits in (2, 4):  # byte-aligned: shift and mask in uint8, no int64 words
        mask = (1 << bits) - 1
        parts = [(packed >> (bits * i)) & mask for i in range(8 // bits)]
        return torch.stack(parts, dim=-1).reshape(*lead, -1)[..., :count]
    chunks = packed.reshape(*lead, -1, bits).to(torch.int32)  # 24-bit words fit
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    words = (chunks << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device) * bits
    codes = (words >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*lead, -1)[..., :count]
