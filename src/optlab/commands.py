"""The commands the CLI, ``optlab rerun`` and recipes run, each declared once.

A command names its inputs and config sections (their fields become its flags) and runs a
job by loading its inputs and calling the Python API, so the CLI has no logic of its own.
"""

from __future__ import annotations

from pathlib import Path

from optlab import api
from optlab.core.calibration import Calibration
from optlab.core.job import COMMANDS, Command, Input, Job, Result, Section, register_command
from optlab.eval.perplexity import PerplexityEval
from optlab.prune.pruner import WandaConfig

MODEL = Input("model", "MODEL", "a model spec or a run directory")


def _load(job: Job) -> api.LoadedModel:
    return api.load_model(
        job.inputs["model"], dtype=job.dtype, device=job.device, seed=job.load_seed
    )


def _prune(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    c = job.configs
    return api.prune(_load(job), c["method"], calib=c["calib"], evaluation=c["eval"],
                     seed=job.seed, out=out, force=force, progress=progress)  # fmt: skip


register_command(Command(
    name="prune",
    help="prune a model: magnitude, Wanda or SparseGPT; unstructured or N:M",
    description="Prune every linear layer of the decoder blocks to the same sparsity (embeddings\n"
    "and the LM head stay dense), layer by layer on calibration windows, then measure\n"
    "perplexity on wiki:eval and write the pruned model and its masks to --out.\n"
    "Methods (--method):",
    inputs=(MODEL,),
    sections=(
        Section("method", WandaConfig(), "pruning", family="prune"),
        Section("calib", Calibration(), "calibration data"),
        Section("eval", PerplexityEval(), "evaluation"),
    ),
    run=_prune,
    examples=("optlab prune default --method sparsegpt --pattern 2:4 --out runs/sg24",),
))  # fmt: skip


def registered() -> list[Command]:
    """The generated commands, in the order --help lists them."""
    return [COMMANDS.get(name) for name in COMMANDS]
