"""``optlab retrain RUN``: retrain the pruned model of a run and write a new run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from optlab.core.run import require_run_kind
from optlab.errors import OptlabError

log = logging.getLogger("optlab")

RETRAINABLE = {"prune", "retrain"}  # runs whose zeros are a pruning mask to keep


def source_run(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A prune (or retrain) run directory holding a model, and its config (which names the
    dense model). Other runs are refused: a quantized model has no float weights to train,
    and an unlearned one no mask to keep."""
    path = Path(path)
    config = require_run_kind(path, RETRAINABLE, "retrain")  # the kind first: it says more
    if not (path / "model" / "config.json").exists():
        raise OptlabError(f"{str(path)!r} is not a run directory with a model (no model/)")
    return path, config
