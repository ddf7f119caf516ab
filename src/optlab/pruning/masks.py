"""Which weights to keep: exact-count masks from scores, N:M patterns, sparsity accounting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.models import LoadedModel, save_model
from optlab.errors import OptlabError


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` at a sparsity, or N:M (zero the N lowest of every M input columns)."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @classmethod
    def parse(cls, pattern: str, sparsity: float | None) -> Pattern:
        if pattern == "unstructured":
            sparsity = 0.5 if sparsity is None else sparsity
            if not 0 <= sparsity < 1:
                raise OptlabError(f"sparsity must be in [0, 1), got {sparsity}")
            return cls(sparsity)
        try:
            n, m = (int(part) for part in pattern.split(":"))
        except ValueError:
            raise OptlabError(f"bad pattern {pattern!r}: use unstructured, 2:4 or 4:8") from None
        if not 0 < n < m:
            raise OptlabError(f"bad pattern {pattern!r}: N:M needs 0 < N < M")
        if sparsity is not None and abs(sparsity - n / m) > 1e-9:
            raise OptlabError(f"pattern {pattern} means sparsity {n / m:g}, not {sparsity:g}")
        return cls(n / m, n, m)


def keep_mask(scores: torch.Tensor, pattern: Pattern, group: str = "row") -> torch.Tensor:
    """Boolean (out, in) mask of the weights to keep: the lowest scores are pruned.

    Unstructured: exactly ``int(sparsity * in)`` per output row (``group="row"``, Wanda's
    paper setting) or ``int(sparsity * numel)`` in the whole matrix (``group="layer"``). Ties
    are broken by position, so the count is exact (a ``<=`` threshold would over-prune ties).
    N:M: in every M consecutive input columns of each row, the N lowest are pruned.
    """
    rows, cols = scores.shape
    # Contiguous whatever the scores' strides (GPT-2's (out, in) view is a transpose).
    keep = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    if pattern.structured:
        if cols % pattern.m:
            raise OptlabError(f"{cols} input columns do not split into groups of {pattern.m}")
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        lowest = groups.topk(pattern.n, dim=-1, largest=False).indices
        return keep.reshape_as(groups).scatter_(-1, lowest, False).reshape(rows, cols)
    if group == "row":
        k = int(cols * pattern.sparsity)
        if k:
            keep.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
        return keep
    if group == "layer":
        k = int(scores.numel() * pattern.sparsity)
        if k:
            keep.view(-1)[scores.flatten().topk(k, largest=False).indices] = False
        return keep
    raise OptlabError(f"bad comparison group {group!r}: use row or layer")


def pruned_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear inside the decoder blocks, by full module name (what pruning touches)."""
    anatomy = Anatomy.of(model)
    return {
        f"{anatomy.blocks_path}.{index}.{name}": module
        for index, block in enumerate(anatomy.blocks)
        for name, module in anatomy.linears(block).items()
    }


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """M = 1[W != 0] for every block linear, (out, in), keyed by module name."""
    return {name: weight_matrix(m) != 0 for name, m in pruned_linears(model).items()}


def sparsity_report(model: nn.Module) -> dict[str, float | dict[str, float]]:
    """Fraction of zero weights per block linear and over all of them. An offloaded linear
    (``device_map`` with disk or CPU offload) holds a meta tensor between forwards: its weight
    is brought in from the offload store to be counted."""
    from accelerate.utils import align_module_device

    per_layer, zeros, total = {}, 0, 0
    for name, module in pruned_linears(model).items():
        with align_module_device(module):
            weight = weight_matrix(module)
            layer_zeros = int((weight == 0).sum())
        per_layer[name] = layer_zeros / weight.numel()
        zeros += layer_zeros
        total += weight.numel()
    return {"total": zeros / total, "per_layer": per_layer}


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of M consecutive input columns of each row has >= N zeros."""
    rows, cols = weight.shape
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(-1)
    return bool((zeros >= n).all())


def save_sparse_model(lm: LoadedModel, folder: Path) -> None:
    """``folder/model/`` (reloadable with ``load_model``) and ``folder/masks.safetensors``."""
    save_model(lm, folder / "model")
    masks = {name: mask.contiguous().cpu() for name, mask in masks_of(lm.model).items()}
    save_file(masks, folder / "masks.safetensors")
