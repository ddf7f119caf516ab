"""Statistics: bootstrap intervals of means, and the statistics of the inputs of linear layers.

:func:`bootstrap_ci` and :func:`paired_bootstrap` give percentile bootstrap intervals (the
audits' confidence intervals); the second resamples items jointly across several aligned
columns (the same questions measured on several models), so a statistic of their means, such
as a recovery ratio, gets an interval that keeps the pairing.

Wanda needs per-feature input norms, SparseGPT and GPTQ the Hessian 2/N sum x x^T. Each is a
small class with ``add_batch(x)``; ``record_inputs`` feeds every listed module's inputs to its
statistic while a block runs (typically inside ``BlockContext.run()``). SparseGPT and GPTQ run
the same column sweep over the inverse Hessian; its set-up (:func:`sweep_start`) lives here,
beside the statistic, so neither method imports the other.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from scipy.linalg import lapack
from torch import nn

log = logging.getLogger("optlab")


def paired_bootstrap(
    columns: Sequence[Sequence[float]],
    statistic: Callable[[np.ndarray], float | None],
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """``statistic`` of the column means and its percentile bootstrap interval.

    ``columns`` are aligned (``columns[k][i]`` is item i measured the k-th way); each resample
    draws the items with replacement, the same draw for every column. ``statistic`` gets the
    vector of column means and may return None where it is undefined (a ratio whose
    denominator vanished): such resamples are left out and counted in ``undefined``, and the
    interval is null when none is defined. Seeded: the same call gives the same interval.
    """
    x = np.asarray(columns, dtype=np.float64).reshape(len(columns), -1)
    n = x.shape[1]
    if n == 0:
        return {"value": None, "low": None, "high": None, "n": 0, "undefined": 0}
    value = statistic(x.mean(axis=1))
    rng = np.random.default_rng(seed)
    means = x[:, rng.integers(0, n, size=(resamples, n))].mean(axis=2)  # (k, resamples)
    drawn = [statistic(means[:, r]) for r in range(resamples)]
    defined = [v for v in drawn if v is not None and math.isfinite(v)]
    low = high = None
    if defined:
        tail = (1 - level) / 2 * 100
        low, high = (float(v) for v in np.percentile(defined, [tail, 100 - tail]))
    return {"value": None if value is None else float(value), "low": low, "high": high,
            "n": int(n), "undefined": resamples - len(defined)}  # fmt: skip


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, float | None]:
    """Mean and percentile bootstrap interval of the mean (seeded; null for no values)."""
    found = paired_bootstrap([values], lambda means: float(means[0]), resamples=resamples,
                             level=level, seed=seed)  # fmt: skip
    return {"mean": found["value"], "low": found["low"], "high": found["high"], "n": found["n"]}


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


def sweep_start(
    weight: torch.Tensor, hessian: torch.Tensor, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 working copy of an (out, in) weight and the inverse Hessian factor that the
    SparseGPT / GPTQ column sweeps start from.

    Inputs that were always zero (a zero on H's diagonal) carry no information: their
    columns are zeroed and their diagonal set to 1, so H stays invertible. Neither argument
    is modified.
    """
    W = weight.detach().float().contiguous().clone()  # GPT-2's (out, in) view is transposed
    H = hessian.detach().clone().float()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, inverse_hessian_factor(H, damp)


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
