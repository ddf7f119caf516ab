"""``optlab retrain RUN``: retrain the pruned model of a run and write a new run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from optlab.core.config import config_to_dict
from optlab.core.models import LoadedModel, load_model
from optlab.core.run import Run, peak_memory_gb, seed_everything
from optlab.core.train import rank_run_path
from optlab.errors import OptlabError
from optlab.eval.perplexity import wiki_perplexity
from optlab.prune.masks import save_sparse_model
from optlab.retrain.perp import PerpConfig, retrain

log = logging.getLogger("optlab")


def source_run(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A run directory holding a model, and its config (which names the dense model)."""
    path = Path(path)
    if not (path / "model" / "config.json").exists():
        raise OptlabError(f"{str(path)!r} is not a run directory with a model (no model/)")
    config = (
        yaml.safe_load((path / "config.yaml").read_text())
        if (path / "config.yaml").exists()
        else {}
    )
    return path, config or {}


def retrain_to_run(
    run_path: str | Path,
    config: PerpConfig,
    out: str | Path,
    *,
    force: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    eval_seq_len: int | None = None,
    eval_limit: int | None = None,
    evaluate: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Load the pruned model of ``run_path``, retrain it (PERP, full or reconstruction),
    evaluate ``wiki:eval`` perplexity and write the result to ``out``."""
    source, source_config = source_run(run_path)
    lm = load_model(str(source), dtype=dtype, device=device, seed=config.seed)
    dense: LoadedModel | None = None
    if config.method == "reconstruct":
        spec = source_config.get("model")
        if not spec:
            raise OptlabError(f"{source}/config.yaml does not name the dense model to match")
        dense = load_model(spec, dtype=dtype, device=device, seed=source_config.get("seed", 0))
    run_config = {"command": "retrain", "source": str(source), **config_to_dict(config)}
    with Run(rank_run_path(out), config=run_config, seed=config.seed, device=str(lm.device),
             dtype=dtype, force=force) as run:  # fmt: skip
        seed_everything(config.seed)
        metrics = retrain(lm, config, dense=dense, progress=progress)
        share, held = 100 * metrics["trainable_share"], metrics["mask_held"]
        log.info("retrained %.3f%% of the parameters; mask held: %s", share, held)
        if evaluate:
            metrics["perplexity"] = wiki_perplexity(lm, eval_seq_len or config.seq_len,
                                                    eval_limit, progress)  # fmt: skip
        source_metrics = source / "metrics.json"
        if source_metrics.exists():
            metrics["source_perplexity"] = json.loads(source_metrics.read_text()).get("perplexity")
        metrics.update(peak_memory_gb())
        run.add_metrics(metrics)
        save_sparse_model(lm, run.dir)
    return {**metrics, "run": str(run.path)}
