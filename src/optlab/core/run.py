"""Run directories: every command leaves one, so each result is traceable and reloadable.

A run is written in a hidden staging folder beside its target and moved into place only when
it finishes, so a failed or interrupted command never leaves half a run, and an existing run
is replaced (with ``force``) only by a complete new one.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
import yaml

from optlab.errors import OptlabError

log = logging.getLogger("optlab")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write a file so that readers see the old content or the new, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)  # mkstemp makes owner-only files
    os.replace(tmp, path)


def environment(seed: int, device: str, dtype: str) -> dict[str, Any]:
    """Versions, git sha, seed and hardware: what it takes to trace a result."""
    versions = {"python": platform.python_version()}
    for package in ("optlab", "torch", "transformers", "accelerate", "numpy", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "versions": versions,
        "git_sha": _git_sha(),
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _git_sha() -> str | None:
    source = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


# The launchers' rank variables (torchrun / accelerate launch, then MPI), as accelerate reads them.
_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")


def is_main_process() -> bool:
    """True on the process that writes results: rank 0 of a multi-process launch, or the only
    process. Read from the launcher's environment, so that it can be asked before any
    Accelerator exists (a run directory opens before training starts)."""
    for name in _RANK_VARIABLES:
        if os.environ.get(name):
            return int(os.environ[name]) == 0
    return True


def rank_run_path(out: str | Path) -> Path:
    """Where this process writes its run directory: ``out`` on the main process, a scratch
    folder (removed at exit) on every other rank. Every rank runs the same job code, and two
    processes staging and moving one run directory into place would race.

    """
    if is_main_process():
        return Path(out)
    import atexit

    scratch = tempfile.mkdtemp(prefix="optlab-rank-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return Path(scratch) / Path(out).name


def check_target(path: str | Path, force: bool) -> None:
    """Refuse an output path before any work when writing a run there would replace something
    (or could not replace it): the one "exists; pass --force" check of every command."""
    path = Path(path)
    if path.exists() and not force:
        raise OptlabError(f"run directory {str(path)!r} exists; pass --force to replace it")
    if path.exists() and not path.is_dir():
        raise OptlabError(f"{str(path)!r} exists and is not a directory")


class Run:
    """A run directory: ``config.yaml``, ``env.json``, ``metrics.json``, ``log.txt``, artefacts.

    >>> with Run("runs/w50", config={"method": "wanda"}, seed=0) as run:
    ...     run.add_metrics({"perplexity": 21.3})
    ...     run.save_text("report.md", "...")
    >>> run.path  # runs/w50, complete
    """

    def __init__(
        self,
        path: str | Path,
        *,
        config: dict[str, Any],
        seed: int = 0,
        device: str = "cpu",
        dtype: str = "float32",
        force: bool = False,
    ) -> None:
        self.path = Path(path)
        check_target(self.path, force)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(
            tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=self.path.parent)
        )
        self.metrics: dict[str, Any] = {}
        self._handler = logging.FileHandler(self.dir / "log.txt", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self._handler)
        self.save_text("config.yaml", yaml.safe_dump(config, sort_keys=False))
        self.save_json("env.json", environment(seed, device, dtype))
        self._finished = False

    def save_json(self, name: str, data: Any) -> Path:
        atomic_write(self.dir / name, json.dumps(data, indent=2, default=_json_default) + "\n")
        return self.path / name

    def save_text(self, name: str, text: str) -> Path:
        atomic_write(self.dir / name, text)
        return self.path / name

    def add_metrics(self, metrics: dict[str, Any]) -> None:
        """Merge into ``metrics.json`` (written at once, so a crash keeps what was measured)."""
        self.metrics.update(metrics)
        self.save_json("metrics.json", self.metrics)

    def finish(self) -> Path:
        """Move the complete run into place (replacing an old one only now)."""
        self._close_log()
        if self.path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-", dir=self.path.parent))
            os.replace(self.path, old / "run")
            os.replace(self.dir, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.dir, self.path)
        self._finished = True
        return self.path

    def abort(self) -> None:
        """Drop the staged run; an existing run at the target stays untouched."""
        self._close_log()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _close_log(self) -> None:
        log.removeHandler(self._handler)
        self._handler.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            if not self._finished:
                self.finish()
        else:
            self.abort()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic | torch.Tensor):
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def peak_memory_gb() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA memory when a GPU was used)."""
    import resource

    peak = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return peak


def execute(
    body: Callable[[Run | None], dict[str, Any]],
    *,
    out: str | Path | None,
    config: dict[str, Any],
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    force: bool = False,
) -> tuple[dict[str, Any], Path | None]:
    """The run harness of every command: seed, then ``body(run)`` in a staged run directory
    at ``out`` (``body(None)`` when ``out`` is None). What ``body`` returns is merged into
    ``metrics.json``; the run moves into place only when ``body`` returns, and a failure or
    an interrupt leaves nothing behind. Returns the metrics and the run's path.

    >>> metrics, path = execute(lambda run: {"x": 1}, out="runs/x", config={"command": "x"})
    """
    seed_everything(seed)
    if out is None:
        return body(None), None
    with Run(
        rank_run_path(out), config=config, seed=seed, device=device, dtype=dtype, force=force
    ) as run:
        metrics = body(run)
        run.add_metrics(metrics)
    log.info("run written to %s", run.path)
    return metrics, run.path
