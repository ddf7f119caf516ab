"""GPTQ (Frantar et al., 2023): quantize a layer column by column and push each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs. Same sweep as SparseGPT (both start from :func:`optlab.core.stats.sweep_start`),
with "prune" replaced by "round to the grid"."""

from __future__ import annotations

import torch

from optlab.core.stats import sweep_start
from optlab.quant.quantizer import (
    QuantizedWeight,
    check_bits,
    grid,
    quantize_codes,
    resolve_group_size,
)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = 128,
    *,
    block_size: int = 128,
    damp: float = 0.01,
) -> QuantizedWeight:
    """Quantize an (out, in) weight minimising ||W X - W_hat X||^2 over the calibration inputs.

    Per-channel grids come from the whole row up front; with groups, each group's grid is
    fitted when the sweep reaches its first column, on the already error-updated weights (as
    in the paper's code). Columns whose input was always zero are set to zero.

    >>> qw = gptq_quantize(weight, stats.matrix, bits=4)   # stats: a core.stats.Hessian
    """
    check_bits(bits)
    W, Hinv = sweep_start(weight, hessian, damp)
    rows, cols = W.shape
    size = resolve_group_size(group_size, cols)

    groups = -(-cols // size)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    scales = torch.empty(rows, groups, dtype=torch.float32, device=W.device)
    zeros = torch.empty(rows, groups, dtype=torch.uint8, device=W.device)
    scale, zero = grid(W, bits)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1 = W[:, start:end].clone()
        Hinv1 = Hinv[start:end, start:end]
        Err1 = torch.zeros_like(W1)
        for i in range(end - start):
            col = start + i
            if col % size == 0:
                if size < cols:  # the group's current weights: rest of this block, then beyond
                    upcoming = torch.cat([W1[:, i:], W[:, end:]], dim=1)[:, :size]
                    scale, zero = grid(upcoming, bits)
                scales[:, col // size], zeros[:, col // size] = scale, zero.to(torch.uint8)
            w = W1[:, i]
            q = quantize_codes(w[:, None], scale, zero, bits)[:, 0]
            codes[:, col] = q.to(torch.uint8)
            err = (w - (q - zero) * scale) / Hinv1[i, i]
            # Column i itself becomes exactly its dequantized value; later columns compensate.
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, start:end] = W1
        W[:, end:] -= Err1 @ Hinv[start:end, end:]
    return QuantizedWeight(codes, scales, zeros, bits, size)
