"""GPTQ (Frantar et al., 2023): quantize a layer column by column and push each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs. Same sweep as SparseGPT (both start from :func:`optlab.core.stats.sweep_start`),
with "prune" replaced by "round to the grid".

Checked beside the official code (IST-DASLab/gptq, ``benchmarks/parity.py --gptq-repo``): the
same damping, dead columns, Cholesky factor of the inverse, lazy block updates, group grids
and act-order, so the same layer error up to the fp16 rounding of the stored scales.
"""

from __future__ import annotations

import torch

from optlab.core.stats import sweep_start
from optlab.quant.quantizer import (
    QuantizedWeight,
    check_bits,
    grid,
    quantize_codes,
    quantize_rtn,
    resolve_group_size,
)


def act_order_permutation(hessian: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing Hessian diagonal (the official ``--act-order``): the inputs
    with the most energy are rounded first, while many columns remain to absorb their error.
    A dead input (zero diagonal) counts as 1, as the official code sets it before sorting."""
    diagonal = hessian.diagonal().float()
    return torch.argsort(torch.where(diagonal == 0, 1.0, diagonal), descending=True, stable=True)


def _group_now(W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor,
               start: int, i: int, size: int) -> torch.Tensor:  # fmt: skip
    """The current weights of the group starting at column ``start + i`` of the block being
    swept: the rest of the block from ``W1``, then any columns beyond it from ``W`` with the
    block's lazy update so far applied (the official code reads ``W`` as it was when the block
    began, which differs only for a group that starts inside a block)."""
    col, end = start + i, start + W1.shape[1]
    beyond = W[:, end : col + size]
    if beyond.shape[1] and i:
        beyond = beyond - Err1[:, :i] @ Hinv[start:col, end : col + size]
    return torch.cat([W1[:, i : i + size], beyond], dim=1)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = 128,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> QuantizedWeight:
    """Quantize an (out, in) weight minimising ||W X - W_hat X||^2 over the calibration inputs.

    Per-channel grids come from the whole row up front; with groups, each group's grid is
    fitted when the sweep reaches its first column, on the already error-updated weights (as
    in the paper's code; see :func:`_group_now`). Columns whose input was always zero are set
    to zero.

    ``act_order`` sweeps the columns by decreasing Hessian diagonal. Groups stay contiguous
    columns of the original order (that is how they are packed), so with groups their grids
    are fitted up front from the original weights: the official ``--act-order
    --static-groups``.

    >>> qw = gptq_quantize(weight, stats.matrix, bits=4)   # stats: a core.stats.Hessian
    """
    check_bits(bits)
    rows, cols = weight.shape
    size = resolve_group_size(group_size, cols)
    order = act_order_permutation(hessian) if act_order else torch.arange(cols)
    order = order.to(weight.device)
    W, Hinv = sweep_start(weight[:, order], hessian[order][:, order], damp)
    group_of = order // size  # the group of each swept column
    groups = -(-cols // size)
    static = act_order and size < cols
    if static:  # every group's grid from the original (dead columns zeroed) weights
        fixed = quantize_rtn(W[:, torch.argsort(order)], bits, size)
        scales, zeros = fixed.scales, fixed.zeros
        # each swept column's grid, looked up once rather than per column in the sweep
        column_scale, column_zero = scales[:, group_of], zeros[:, group_of].float()
    else:
        scales = torch.empty(rows, groups, dtype=torch.float32, device=W.device)
        zeros = torch.empty(rows, groups, dtype=torch.uint8, device=W.device)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    scale, zero = grid(W, bits)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1 = W[:, start:end].clone()
        Hinv1 = Hinv[start:end, start:end]
        Err1 = torch.zeros_like(W1)
        for i in range(end - start):
            col = start + i
            if static:
                scale, zero = column_scale[:, col], column_zero[:, col]
            elif col % size == 0:
                if size < cols:
                    scale, zero = grid(_group_now(W, W1, Err1, Hinv, start, i, size), bits)
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
    if act_order:
        codes = codes[:, torch.argsort(order)]
    return QuantizedWeight(codes, scales, zeros, bits, size)
