"""``optlab retrain RUN``: retrain the pruned model of a run and write a new run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from optlab.errors import OptlabError

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
