"""SparseGPT (Frantar & Alistarh, 2023): prune a layer and update the kept weights to
compensate, with the inverse Hessian of the layer's inputs (optimal brain surgeon, column by
column, in blocks with lazy updates)."""

from __future__ import annotations

import logging

import torch
from scipy.linalg import lapack

from optlab.prune.masks import Pattern

log = logging.getLogger("optlab")


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper triangular U with U^T U = (H + damp * mean(diag H) * I)^-1, in fp32.

    With R the reversal of rows and columns, R H R = L L^T gives H^-1 = U^T U for
    U = R L^-1 R: one Cholesky and one triangular inverse (2n^3/3 flops), half the work of
    inverting H and factoring the inverse. If H is too ill-conditioned for Cholesky, damping
    grows tenfold (and a warning says so) rather than failing the whole run.
    """
    mean = hessian.diagonal().mean()
    for attempt in range(4):
        factor = damp * 10**attempt
        damped = hessian.flip(0, 1)  # a copy, damped in place: no n x n identity is built
        damped.diagonal().add_(factor * mean)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            if attempt:
                log.warning("the Hessian needed damping %.3g to be invertible", factor)
            return _lower_inverse(lower).flip(0, 1)
    raise RuntimeError("Hessian is not positive definite even with heavy damping")


def _lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """Inverse of a lower triangular matrix; LAPACK's trtri on CPU (torch has no binding)."""
    if lower.device.type == "cpu":
        inverse, info = lapack.strtri(lower.numpy(), lower=1, overwrite_c=1)
        if info != 0:
            raise RuntimeError(f"triangular inverse failed (LAPACK info {info})")
        return torch.from_numpy(inverse)
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False)


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
    W = weight.detach().float().contiguous().clone()  # GPT-2's (out, in) view is transposed
    H = hessian.detach().clone().float()
    cols = W.shape[1]
    dead = H.diagonal() == 0  # inputs that were always zero carry no information
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = inverse_hessian_factor(H, damp)

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
