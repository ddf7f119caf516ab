"""How much each decoder layer (or each linear) matters, three ways (CPTQuant).

* ``cmpq``: mean-pool the hidden states of every layer over the sequence on calibration
  windows (index 0 = embeddings, l = output of block l); for block l and every other index j
  fit a 1-component CCA and take rho_lj, the correlation of the first canonical pair;
  s_l = 1 - mean_j rho_lj. A layer unlike the others carries unique information.
  Deviation (option ``cca_dims``, default 8): each layer's pooled states are first reduced to
  their top principal components. With fewer windows than hidden features, raw CCA finds a
  perfect canonical pair for *every* pair of layers (rho = 1, all scores 0); ``cca_dims=0``
  keeps the official raw features.
* ``pmpq``: zero the 30% smallest-magnitude weights of each linear of that unit only;
  s = ppl_pruned - ppl_base on the calibration windows (positive = pruning hurts).
* ``tdmpq``: a Taylor estimate of the loss change when the unit's weights move by
  delta = Q(W) - W, their RTN error at the lowest candidate width. With g_b the gradient of
  the calibration loss on window b (b = 1..B) and g = mean_b g_b,

      s = |g . delta| + 1/2 * mean_b (g_b . delta)^2

  the first-order term plus the second-order term with the Hessian replaced by the empirical
  Fisher mean_b g_b g_b^T (so delta^T F delta = mean_b (g_b . delta)^2, no diagonal
  approximation needed). Near a minimum g ~ 0 and the Fisher term dominates.

>>> units = sensitivity_units(lm.model, "layer")
>>> sensitivities(lm.model, "tdmpq", windows, units)   # {"model.layers.0": 0.013, ...}
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.errors import OptlabError, did_you_mean
from optlab.eval.scorer import Scorer
from optlab.pruning.masks import Pattern, keep_mask
from optlab.quant.quantizer import quantize_rtn

METHODS = ("cmpq", "pmpq", "tdmpq")
GRANULARITIES = ("layer", "linear")


def sensitivity_units(model: nn.Module, granularity: str = "layer") -> dict[str, list[str]]:
    """Units that get one bit width each -> the full names of their linears.

    ``layer``: one unit per decoder block (named by its path, e.g. ``model.layers.3``);
    ``linear``: one unit per block linear.
    """
    if granularity not in GRANULARITIES:
        raise did_you_mean("granularity", granularity, GRANULARITIES)
    anatomy = Anatomy.of(model)
    units: dict[str, list[str]] = {}
    for index, block in enumerate(anatomy.blocks):
        prefix = f"{anatomy.blocks_path}.{index}"
        names = [f"{prefix}.{name}" for name in anatomy.linears(block)]
        if granularity == "layer":
            units[prefix] = names
        else:
            units.update({name: [name] for name in names})
    return units


def calib_nll(model: nn.Module, windows: Sequence[torch.Tensor]) -> float:
    """Mean next-token negative log-likelihood over batches of token windows (the Scorer's)."""
    batch = max((ids.shape[0] for ids in windows), default=1)
    return Scorer.of_tokens(model, batch_size=batch).windows_nll(windows)


def cmpq_scores(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    units: dict[str, list[str]],
    cca_dims: int = 8,
) -> dict[str, float]:
    """s_l = 1 - mean_{j != l} rho_lj over mean-pooled hidden states (per decoder layer)."""
    from sklearn.cross_decomposition import CCA

    anatomy = Anatomy.of(model)
    layer_units = sensitivity_units(model, "layer")
    if set(units) != set(layer_units):
        raise OptlabError("cmpq scores decoder layers only: use granularity 'layer'")
    device = next(model.parameters()).device
    pooled: list[list[np.ndarray]] = []
    with torch.no_grad():
        for ids in windows:
            out = model(input_ids=ids.to(device), output_hidden_states=True, use_cache=False)
            pooled.append([h.float().mean(1).cpu().numpy() for h in out.hidden_states])
    states = [np.concatenate(parts) for parts in zip(*pooled, strict=True)]
    if states[0].shape[0] < 3:
        raise OptlabError("cmpq needs at least 3 calibration windows for a correlation")
    if cca_dims:
        states = [_principal_components(x, cca_dims) for x in states]
    count = len(anatomy.blocks) + 1
    rho = np.eye(count)
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    for i, j in tqdm(pairs, desc="cmpq CCA", leave=False, disable=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns when NIPALS stops early
            u, v = (
                CCA(n_components=1, max_iter=500)
                .fit(states[i], states[j])
                .transform(states[i], states[j])
            )
        r = np.corrcoef(u[:, 0], v[:, 0])[0, 1]
        rho[i, j] = rho[j, i] = abs(r) if np.isfinite(r) else 0.0
    # hidden_states[l + 1] is the output of block l.
    return {
        unit: float(1 - np.delete(rho[index + 1], index + 1).mean())
        for index, unit in enumerate(layer_units)
    }


def _principal_components(x: np.ndarray, dims: int) -> np.ndarray:
    """Coordinates of the rows of ``x`` on its top ``dims`` principal axes."""
    centred = x - x.mean(0)
    u, singular, _ = np.linalg.svd(centred, full_matrices=False)
    dims = min(dims, (x.shape[0] - 1) // 2, x.shape[1])  # well below the sample count
    return u[:, :dims] * singular[:dims]


def pmpq_scores(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    units: dict[str, list[str]],
    fraction: float = 0.3,
) -> dict[str, float]:
    """Perplexity increase when only this unit's linears lose their smallest ``fraction``."""
    modules = dict(model.named_modules())
    pattern = Pattern(fraction)
    base = math.exp(calib_nll(model, windows))
    scores = {}
    for unit, names in tqdm(units.items(), desc="pmpq", leave=False, disable=None):
        saved = {name: weight_matrix(modules[name]).clone() for name in names}
        with torch.no_grad():
            for name in names:
                weight = weight_matrix(modules[name])
                weight.mul_(keep_mask(weight.abs().contiguous(), pattern, "layer"))
        try:
            scores[unit] = math.exp(calib_nll(model, windows)) - base
        finally:
            with torch.no_grad():
                for name, weight in saved.items():
                    weight_matrix(modules[name]).copy_(weight)
    return scores


def tdmpq_scores(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    units: dict[str, list[str]],
    bits: int,
    group_size: int | None,
    rounder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """|g . delta| + 1/2 mean_b (g_b . delta)^2 with delta the unit's RTN error at ``bits``
    (or ``rounder(w) - w``: a GGUF type's own rounding)."""
    modules = dict(model.named_modules())
    names = [name for members in units.values() for name in members]
    deltas = []
    for name in tqdm(names, desc="tdmpq rounding errors", leave=False, disable=None):
        weight = weight_matrix(modules[name])
        if rounder is not None:
            delta = rounder(weight).to(weight.dtype) - weight
        else:
            delta = quantize_rtn(weight, bits, group_size).dequantize(weight.dtype) - weight
        # Flat, fp32 and in the parameter's own layout (GPT-2's Conv1D stores in x out): each
        # g_b . delta is then one dot product with the gradient as autograd returns it.
        deltas.append(_as_matrix(modules[name], delta).float().contiguous().view(-1))
    device = next(model.parameters()).device
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        modules[name].weight.requires_grad_(True)
    products: list[list[float]] = []  # g_b . delta per window, per linear of ``names``
    try:
        rows = [row[None] for ids in windows for row in ids]
        for ids in tqdm(rows, desc="tdmpq gradients", leave=False, disable=None):
            ids = ids.to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            grads = torch.autograd.grad(loss, [modules[n].weight for n in names])
            dots = [torch.dot(g.float().reshape(-1), d) for g, d in zip(grads, deltas, strict=True)]
            products.append(torch.stack(dots).tolist())
            del grads  # free this window's gradients before the next forward
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    table = np.array(products, dtype=np.float64)  # [window, linear]
    column = {name: i for i, name in enumerate(names)}
    scores = {}
    for unit, members in units.items():
        per_window = table[:, [column[name] for name in members]].sum(1)
        scores[unit] = float(abs(per_window.mean()) + 0.5 * np.mean(per_window**2))
    return scores


def _as_matrix(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """The gradient in the (out, in) layout of ``weight_matrix`` (GPT-2's Conv1D is in x out)."""
    return grad if isinstance(module, nn.Linear) else grad.t()


def sensitivities(
    model: nn.Module,
    method: str,
    windows: Sequence[torch.Tensor],
    units: dict[str, list[str]],
    *,
    bits: int = 4,
    group_size: int | None = 128,
    prune_fraction: float = 0.3,
    cca_dims: int = 8,
    rounder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Score every unit with ``method``; each score is finite, higher = more sensitive."""
    if method not in METHODS:
        raise did_you_mean("sensitivity", method, METHODS)
    if method == "cmpq":
        scores = cmpq_scores(model, windows, units, cca_dims)
    elif method == "pmpq":
        scores = pmpq_scores(model, windows, units, prune_fraction)
    else:
        scores = tdmpq_scores(model, windows, units, bits, group_size, rounder)
    bad = [unit for unit, s in scores.items() if not math.isfinite(s)]
    if bad:
        raise OptlabError(f"{method} gave non-finite sensitivities for {', '.join(bad)}")
    return scores
