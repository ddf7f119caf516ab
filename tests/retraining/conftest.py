"""Pruning helpers for the retraining tests: the retraining code only sees zeros in weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from optlab.core.anatomy import weight_matrix
from optlab.core.data import load_text
from optlab.pruning.masks import Pattern, check_nm, keep_mask, pruned_linears


@torch.no_grad()
def prune_rows(model: nn.Module, sparsity: float = 0.5) -> None:
    """Zero the ``sparsity`` smallest-magnitude weights of every row of every block linear."""
    _prune(model, Pattern(sparsity))


@torch.no_grad()
def prune_2_4(model: nn.Module) -> None:
    """Semi-structured 2:4: in every 4 consecutive inputs of a row, zero the 2 smallest."""
    _prune(model, Pattern(0.5, 2, 4))


def _prune(model: nn.Module, pattern: Pattern) -> None:
    for linear in pruned_linears(model).values():
        weight = weight_matrix(linear)
        weight.mul_(keep_mask(weight.abs(), pattern))


def is_2_4(weight: torch.Tensor) -> bool:
    return check_nm(weight, 2, 4)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small slice of the calibration text: tokenizing all of it costs seconds per test."""
    path = Path(tmp_path_factory.mktemp("corpus")) / "calib.txt"
    path.write_text(load_text("wiki:calib")[:20_000], encoding="utf-8")
    return str(path)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and when other processes keep both cores
    busy, OpenMP's hand-offs make each tiny op 10-50x slower (20 steps: 1 s vs 50 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
