"""SparseGPT (Frantar & Alistarh, 2023): prune a layer and update the kept weights to
compensate, with the inverse Hessian of the layer's inputs (optimal brain surgeon, column by
column, in blocks with lazy updates)."""

from __future__ import annotations

import torch

from optlab.core.stats import sweep_start
from optlab.pruning.masks import Pattern


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    *,
    block_size: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """Return the pruned and compensated (out, in) weight (fp32 math, input dtype out).

    Per block of ``block_size`` columns: unstructured masks prune exactly
    ``int(sparsity * rows * block)`` weights with the lowest w^2 / Hinv_ii^2 across the block;
    N:M masks choose per M columns as the sweep reaches them. Each pruned weight's error is
    spread over the not-yet-visited columns of its row; the rest of the matrix gets one lazy
    update per block.
    """
    W, Hinv = sweep_start(weight, hessian, damp)
    cols = W.shape[1]

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1 = W[:, start:end].clone()
        Hinv1 = Hinv[start:end, start:end]
        d = Hinv1.diagonal()
        prune = torch.zeros_like(W1, dtype=torch.bool)
        if not pattern.structured:
            scores = W1.square() / d.square()
            k = int(scores.numel() * pattern.sparsity)
            if k:
                prune.view(-1)[scores.flatten().topk(k, largest=False).indices] = True
        Err1 = torch.zeros_like(W1)
        for i in range(end - start):
            if pattern.structured and i % pattern.m == 0:
                group = W1[:, i : i + pattern.m].square() / d[i : i + pattern.m].square()
                lowest = group.topk(pattern.n, dim=1, largest=False).indices
                prune[:, i : i + pattern.m].scatter_(1, lowest, True)
            w = W1[:, i]
            err = torch.where(prune[:, i], w, 0) / d[i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = torch.where(prune[:, i], 0, W1[:, i])
            Err1[:, i] = err
        W[:, start:end] = W1
        W[:, end:] -= Err1 @ Hinv[start:end, end:]
    return W.to(weight.dtype)
