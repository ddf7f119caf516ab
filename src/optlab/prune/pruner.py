"""``prune(lm, PruneConfig)``: magnitude, Wanda or SparseGPT over every block linear.

Calibrated methods run layer by layer (``run_layerwise``): collect the statistic of each
linear's inputs while the block runs, prune the block, and let the runner propagate the
pruned block's outputs to the next block, as the papers do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.config import config_to_dict
from optlab.core.data import load_text, sample_windows
from optlab.core.layerwise import BlockContext, batched, run_layerwise
from optlab.core.models import LoadedModel
from optlab.core.run import Run, peak_memory_gb, seed_everything
from optlab.core.stats import Hessian, InputNorms, record_inputs
from optlab.errors import OptlabError, did_you_mean
from optlab.eval.perplexity import wiki_perplexity
from optlab.eval.scorer import context_length
from optlab.prune.masks import Pattern, keep_mask, save_sparse_model, sparsity_report
from optlab.prune.sparsegpt import sparsegpt_prune

log = logging.getLogger("optlab")

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class PruneConfig:
    """How to prune. Defaults follow the papers: Wanda per output row, SparseGPT with 1%
    damping and blocks of 128 columns, 128 calibration windows of the context length."""

    method: str = "wanda"
    sparsity: float | None = None  # default 0.5; N:M patterns imply N/M
    pattern: str = "unstructured"  # or "2:4", "4:8"
    group: str = "row"  # comparison group for magnitude / Wanda: row (paper) or layer
    calib: str = "wiki:calib"
    n_calib: int = 128
    seq_len: int | None = None  # default: the model's context, capped at 2048
    batch_size: int = 8
    damp: float = 0.01
    block_size: int = 128
    seed: int = 0

    def validate(self) -> Pattern:
        if self.method not in METHODS:
            raise did_you_mean("pruning method", self.method, METHODS)
        if self.group not in ("row", "layer"):
            raise OptlabError(f"bad comparison group {self.group!r}: use row or layer")
        if self.n_calib < 1 or self.batch_size < 1 or self.block_size < 1:
            raise OptlabError("n_calib, batch_size and block_size must be positive")
        if not 0 <= self.damp < 1:
            raise OptlabError(f"damp must be in [0, 1), got {self.damp}")
        return Pattern.parse(self.pattern, self.sparsity)


def prune(lm: LoadedModel, config: PruneConfig, *, progress: bool = True) -> dict[str, Any]:
    """Prune ``lm.model`` in place; return sparsity (total and per layer) and timing.

    >>> prune(load_model("default"), PruneConfig(method="sparsegpt", pattern="2:4"))
    """
    pattern = config.validate()
    model = lm.model
    anatomy = Anatomy.of(model)
    start = time.perf_counter()
    if config.method == "magnitude":
        with torch.no_grad():
            for block in anatomy.blocks:
                for module in anatomy.linears(block).values():
                    weight = weight_matrix(module)
                    weight.mul_(keep_mask(weight.abs(), pattern, config.group))
    else:
        seq_len = config.seq_len or context_length(model)
        calib = sample_windows(
            lm.tokenizer, load_text(config.calib), config.n_calib, seq_len, config.seed
        )

        def on_block(ctx: BlockContext) -> None:
            _prune_block(anatomy, ctx, config, pattern)

        run_layerwise(model, batched(calib, config.batch_size), on_block, progress=progress)
    seconds = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "sparsity": sparsity_report(model),
        "weights_gb": weight_bytes / 1024**3,
        "prune_seconds": seconds,
        "seconds_per_block": seconds / len(anatomy.blocks),
    }


@torch.no_grad()
def _prune_block(
    anatomy: Anatomy, ctx: BlockContext, config: PruneConfig, pattern: Pattern
) -> None:
    linears = anatomy.linears(ctx.block)
    device = ctx.inputs[0].device
    statistic = InputNorms if config.method == "wanda" else Hessian
    stats = {name: statistic(weight_matrix(m).shape[1], device) for name, m in linears.items()}
    with record_inputs(linears, stats):
        ctx.run()
    for name, module in linears.items():
        weight = weight_matrix(module)
        if config.method == "wanda":
            # S_ij = |W_ij| * ||X_j||: the weight times the typical size of its input.
            scores = weight.abs().float() * stats[name].mean_square.sqrt()
            weight.mul_(keep_mask(scores, pattern, config.group))
        else:
            weight.copy_(
                sparsegpt_prune(weight, stats[name].matrix, pattern,
                                block_size=config.block_size, damp=config.damp)
            )  # fmt: skip


def prune_to_run(
    lm: LoadedModel,
    config: PruneConfig,
    out: str | Path,
    *,
    force: bool = False,
    eval_seq_len: int | None = None,
    eval_limit: int | None = None,
    evaluate: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune, evaluate perplexity on ``wiki:eval`` and write a run directory holding the
    pruned model (``model/``, reloadable with ``load_model``) and its masks
    (``masks.safetensors``)."""
    config.validate()
    run_config = {"command": "prune", "model": lm.spec, **config_to_dict(config)}
    with Run(out, config=run_config, seed=config.seed, device=str(lm.device),
             dtype=str(next(lm.model.parameters()).dtype), force=force) as run:  # fmt: skip
        seed_everything(config.seed)
        log.info("pruning %s with %s (%s)", lm.spec, config.method, config.pattern)
        metrics = prune(lm, config, progress=progress)
        log.info("sparsity %.4f in %.1f s", metrics["sparsity"]["total"], metrics["prune_seconds"])
        if evaluate:
            seq_len = eval_seq_len or config.seq_len
            metrics["perplexity"] = wiki_perplexity(lm, seq_len, eval_limit, progress)
        metrics.update(peak_memory_gb())
        run.add_metrics(metrics)
        save_sparse_model(lm, run.dir)
    log.info("pruned model written to %s", run.path)
    return {**metrics, "run": str(run.path)}
