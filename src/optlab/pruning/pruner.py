"""``prune(lm, WandaConfig(...), calib)``: magnitude, Wanda or SparseGPT over every block linear.

One config type per method, registered under the ``prune`` command; ``prune`` dispatches on
the config's type. Calibrated methods run layer by layer (``run_layerwise``): collect the
method's statistic of each linear's inputs while the block runs, prune the block, and let the
runner propagate the pruned block's outputs to the next block, as the papers do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.config import METHODS, configurable, option, require, require_positive
from optlab.core.layerwise import BlockContext, batched, run_layerwise
from optlab.core.models import LoadedModel, require_finite_weights
from optlab.core.stats import Hessian, InputNorms, InputStatistic, record_inputs
from optlab.errors import OptlabError
from optlab.pruning.masks import Pattern, keep_mask, sparsity_report
from optlab.pruning.sparsegpt import sparsegpt_prune


@dataclass(frozen=True)
class _Sparsity:
    """What every pruning method shares: how much to prune, in which pattern."""

    sparsity: float | None = option(None, "fraction of each linear's weights pruned (default "
                                    "0.5; an N:M pattern implies N/M)")  # fmt: skip
    pattern: str = option("unstructured", "unstructured, or N:M such as 2:4 or 4:8")

    def __post_init__(self) -> None:
        self.target()  # validates sparsity and pattern together

    def target(self) -> Pattern:
        return Pattern.parse(self.pattern, self.sparsity)


@dataclass(frozen=True)
class _RowGroup(_Sparsity):
    group: str = option("row", "weights compete within each output row (the paper) or the "
                        "whole layer", choices=("row", "layer"))  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.group in ("row", "layer"), f"bad comparison group {self.group!r}: use row "
                "or layer")  # fmt: skip


@configurable("magnitude")
@dataclass(frozen=True)
class MagnitudeConfig(_RowGroup):
    """Prune the smallest |W|; no calibration data.

    >>> MagnitudeConfig(sparsity=0.3, group="layer")
    MagnitudeConfig(sparsity=0.3, pattern='unstructured', group='layer')
    """


@configurable("wanda")
@dataclass(frozen=True)
class WandaConfig(_RowGroup):
    """Wanda (Sun et al. 2023): prune the smallest |W_ij| * ||X_j||, per output row.

    >>> WandaConfig(pattern="2:4").target().sparsity
    0.5
    """


@configurable("sparsegpt")
@dataclass(frozen=True)
class SparseGPTConfig(_Sparsity):
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with weight updates, in fp32.

    >>> SparseGPTConfig(damp=0.01, block_size=128).block_size
    128
    """

    damp: float = option(0.01, "Hessian damping, a fraction of its mean diagonal")
    block_size: int = option(128, "columns pruned and updated together")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "block_size")
        require(0 <= self.damp < 1, f"damp must be in [0, 1), got {self.damp}")


PruneMethodConfig = MagnitudeConfig | WandaConfig | SparseGPTConfig


@dataclass(frozen=True)
class _LayerRule:
    """How one method prunes one linear: the input statistic it needs (None: no data) and the
    in-place edit of the (out, in) weight given that statistic."""

    statistic: type[InputStatistic] | None
    apply: Callable[[torch.Tensor, Any, Any, Pattern], None]


def _magnitude(weight: torch.Tensor, _: None, config: MagnitudeConfig, pattern: Pattern) -> None:
    weight.mul_(keep_mask(weight.abs(), pattern, config.group))


def _wanda(weight: torch.Tensor, norms: InputNorms, config: WandaConfig, pattern: Pattern) -> None:
    # S_ij = |W_ij| * ||X_j||: the weight times the typical size of its input.
    scores = weight.abs().float() * norms.mean_square.sqrt()
    weight.mul_(keep_mask(scores, pattern, config.group))


def _sparsegpt(
    weight: torch.Tensor, hessian: Hessian, config: SparseGPTConfig, pattern: Pattern
) -> None:
    weight.copy_(sparsegpt_prune(weight, hessian.matrix, pattern, block_size=config.block_size,
                                 damp=config.damp))  # fmt: skip


METHODS.register("prune", MagnitudeConfig, "|W|, no calibration",
                 _LayerRule(None, _magnitude))  # fmt: skip
METHODS.register("prune", WandaConfig, "|W| * ||x||, per output row (Sun et al. 2023)",
                 _LayerRule(InputNorms, _wanda))  # fmt: skip
METHODS.register("prune", SparseGPTConfig, "OBS with weight updates, 1% damping, blocks of 128 "
                 "columns (Frantar & Alistarh 2023)", _LayerRule(Hessian, _sparsegpt))  # fmt: skip


def _rule(config: Any) -> _LayerRule:
    return METHODS.of(config, "prune").handler


def needs_calibration(config: PruneMethodConfig) -> bool:
    return _rule(config).statistic is not None


def prune(
    lm: LoadedModel,
    config: PruneMethodConfig,
    calib: torch.Tensor | None = None,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune every block linear of ``lm.model`` in place; ``calib`` is an (n, seq_len) tensor
    of token windows (not needed by magnitude). Returns sparsity (total and per layer) and
    timing.

    >>> prune(load_model("tiny:llama"), SparseGPTConfig(pattern="2:4"), calib_windows)
    """
    rule, pattern = _rule(config), config.target()
    model = lm.model
    require_finite_weights(model, "prune")  # NaN scores would make a wrong mask
    anatomy = Anatomy.of(model)
    start = time.perf_counter()
    if rule.statistic is None:
        with torch.no_grad():
            for block in anatomy.blocks:
                for module in anatomy.linears(block).values():
                    rule.apply(weight_matrix(module), None, config, pattern)
    else:
        if calib is None:
            raise OptlabError(f"{config.TYPE} needs calibration windows")  # type: ignore[union-attr]

        @torch.no_grad()
        def on_block(ctx: BlockContext) -> None:
            linears = anatomy.linears(ctx.block)
            device = ctx.inputs[0].device
            stats = {name: rule.statistic(weight_matrix(m).shape[1], device)  # type: ignore[misc]
                     for name, m in linears.items()}  # fmt: skip
            with record_inputs(linears, stats):
                ctx.run()
            for name, module in linears.items():
                rule.apply(weight_matrix(module), stats[name], config, pattern)

        run_layerwise(model, batched(calib, batch_size), on_block, progress=progress)
    seconds = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "sparsity": sparsity_report(model),
        "weights_gb": weight_bytes / 1024**3,
        "prune_seconds": seconds,
        "seconds_per_block": seconds / len(anatomy.blocks),
    }
