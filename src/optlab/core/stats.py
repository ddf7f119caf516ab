"""Statistics of the inputs of linear layers, gathered with forward hooks.

Wanda needs per-feature input norms, SparseGPT and GPTQ the Hessian 2/N sum x x^T. Each is a
small class with ``add_batch(x)``; ``record_inputs`` feeds every listed module's inputs to its
statistic while a block runs (typically inside ``BlockContext.run()``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

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
    modules: Mapping[str, nn.Module], stats: dict[str, InputStatistic]
) -> Iterator[None]:
    """While open, every forward of ``modules[name]`` adds its input to ``stats[name]``.

    Modules that are handed the very same input tensor one after the other (the q/k/v
    projections, gate/up) share one statistic: the first time it happens, the later module's
    entry in ``stats`` becomes the earlier one's object, and each input is then added once.
    """
    last: list[Any] = [None, None]  # the last input added and its statistic (kept alive)
    fed: set[str] = set()

    def hook(name: str, x: torch.Tensor) -> None:
        if x is last[0] and type(stats[name]) is type(last[1]):
            if name not in fed:  # first batch: join the statistic that took this input
                stats[name] = last[1]
                fed.add(name)
            if stats[name] is last[1]:
                return
        stats[name].add_batch(x.detach())
        last[:] = x, stats[name]
        fed.add(name)

    handles = [
        modules[name].register_forward_hook(
            lambda _module, args, _out, name=name: hook(name, args[0])
        )
        for name in stats
    ]
    try:
        yield
    finally:
        last[:] = None, None
        for handle in handles:
            handle.remove()
