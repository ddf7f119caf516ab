"""Statistics of the inputs of linear layers, gathered with forward hooks.

Wanda needs per-feature input norms, SparseGPT and GPTQ the Hessian 2/N sum x x^T. Each is a
small class with ``add_batch(x)``; ``record_inputs`` feeds every listed module's inputs to its
statistic while a block runs (typically inside ``BlockContext.run()``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Protocol

import torch
from torch import nn


class InputStatistic(Protocol):
    def add_batch(self, x: torch.Tensor) -> None: ...


class InputNorms:
    """Mean of x_j^2 over all tokens seen, per input feature j (Wanda's ||X_j||^2 / N)."""

    def __init__(self, features: int, device: torch.device | str = "cpu") -> None:
        self.sum_squares = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sum_squares.device, torch.float64)
        self.sum_squares += x.square().sum(0)
        self.tokens += x.shape[0]

    @property
    def mean_square(self) -> torch.Tensor:
        return (self.sum_squares / max(self.tokens, 1)).float()


class Hessian:
    """H = (2/N) sum over tokens of x x^T, in fp32 whatever the model's dtype (SparseGPT, GPTQ)."""

    def __init__(self, features: int, device: torch.device | str = "cpu") -> None:
        self.matrix = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.matrix.device, torch.float32)
        n = x.shape[0]
        # Running mean: rescale the old sum so H stays (2/N) X X^T after every batch.
        self.matrix *= self.tokens / (self.tokens + n)
        self.tokens += n
        x = x * (2 / self.tokens) ** 0.5
        self.matrix += x.T @ x


@contextlib.contextmanager
def record_inputs(
    modules: Mapping[str, nn.Module], stats: Mapping[str, InputStatistic]
) -> Iterator[None]:
    """While open, every forward of ``modules[name]`` adds its input to ``stats[name]``."""
    handles = [
        modules[name].register_forward_hook(
            lambda _module, args, _out, stat=stat: stat.add_batch(args[0].detach())
        )
        for name, stat in stats.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
