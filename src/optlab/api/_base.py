"""The pieces every API function shares: one model resolver, the job a call records, the run
harness, and calibration data resolved from a spec; and ``rerun``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from optlab.core.calibration import Calibration
from optlab.core.job import GIVEN, Job, Result, load_job, run_job
from optlab.core.models import LoadedModel, load_model
from optlab.core.run import execute
from optlab.eval.scorer import window_length
from optlab.unlearning.scenarios import Scenario

log = logging.getLogger("optlab")


def resolve_model(
    model: LoadedModel | str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """A loaded model as is; a spec or run directory loaded (the one resolver of inputs).

    >>> resolve_model("tiny:opt").family
    'opt'
    """
    if isinstance(model, LoadedModel):
        return model
    return load_model(str(model), dtype=dtype, device=device, seed=seed)


def job_of(
    command: str,
    lm: LoadedModel,
    seed: int,
    inputs: dict[str, Any] | None = None,
    **configs: Any,
) -> Job:
    dtype = lm.dtype_name
    return Job(command, inputs or {"model": lm.spec}, configs, seed=seed, device=str(lm.device),
               dtype=dtype, model_seed=None if lm.seed == seed else lm.seed)  # fmt: skip


def execute_job(job: Job, body: Any, out: str | Path | None, force: bool) -> Result:
    metrics, path = execute(body, out=out, config=job.to_dict(), seed=job.seed,
                            device=job.device, dtype=job.dtype, force=force)  # fmt: skip
    return Result(metrics, path)


def windows_of(
    lm: LoadedModel, calib: Calibration | torch.Tensor, seed: int, default: int | None = None
) -> torch.Tensor:
    """The calibration windows: a tensor as given, or a spec resolved against the model's
    context (``default``: the command's documented length, capped to fit)."""
    if isinstance(calib, torch.Tensor):
        return calib
    seq_len = window_length(lm.model, calib.seq_len, default=default)
    return calib.windows(lm.tokenizer, seq_len, seed)


def data_record(data: Any) -> Any:
    """How config.yaml records data given in Python (a tensor: its shape; a :class:`Scenario`:
    its forget / retain / holdout sizes), and that it cannot replay."""
    if isinstance(data, torch.Tensor):
        return {GIVEN: list(data.shape)}
    if isinstance(data, Scenario):
        return {GIVEN: [len(data.forget), len(data.retain), len(data.holdout)]}
    return data


def rerun(
    run: str | Path,
    *,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Replay a run from its ``config.yaml`` (the same command, configs and seed).

    >>> first = prune("tiny:llama", MagnitudeConfig(), out="runs/m50", progress=False)
    >>> again = rerun("runs/m50", out="runs/m50-again", progress=False)
    >>> again["sparsity"] == first["sparsity"], again.run.name
    (True, 'm50-again')
    """
    return run_job(load_job(run), out, force=force, progress=progress)
