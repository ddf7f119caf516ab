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
from optlab.eval.tasks import TaskEval
from optlab.prune.pruner import WandaConfig
from optlab.quant.quantize import RTNConfig, StorageConfig, TDMPQConfig
from optlab.retrain.perp import PerpConfig

MODEL = Input("model", "MODEL", "a model spec or a run directory")
MODEL_OR_RUN = Input("model", "MODEL_OR_RUN", "a model spec, or a run directory (its model/)")


def _load(job: Job) -> api.LoadedModel:
    return api.load_model(
        job.inputs["model"], dtype=job.dtype, device=job.device, seed=job.load_seed
    )


def _info(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.info(_load(job))


register_command(Command(
    name="info",
    help="describe a model: family, blocks, parameters, linears",
    description="Load MODEL and describe its anatomy: the family, decoder blocks, parameter\n"
    "count, context length and the linear layers of each block (the ones methods act on).",
    inputs=(MODEL,),
    sections=(),
    run=_info,
    out="none",
    examples=("optlab info default",),
))  # fmt: skip


def _eval(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.evaluate(_load(job), job.configs["tasks"], seed=job.seed, out=out, force=force,
                        progress=progress)  # fmt: skip


register_command(Command(
    name="eval",
    help="evaluate a model or run on named tasks",
    description="Evaluate MODEL (or the model of a run directory) on tasks:\n"
    "  ppl:wiki ppl:book ppl:code ppl:FILE.txt   perplexity, non-overlapping windows\n"
    "  mc:sentiment mc:analogy mc:FILE.jsonl     multiple-choice accuracy\n"
    "  unlearn:RUN                               FA, RA, MIA, AUCs, ppl on an unlearn run's\n"
    "                                            data (--limit: samples, default 100)",
    inputs=(MODEL_OR_RUN,),
    sections=(Section("tasks", TaskEval(), "tasks"),),
    run=_eval,
    out="optional",
    examples=("optlab eval default --tasks ppl:wiki --seq-len 512 --limit 40",),
))  # fmt: skip


def _prune(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    c = job.configs
    return api.prune(_load(job), c["method"], calib=c["calib"], evaluation=c["eval"],
                     seed=job.seed, out=out, force=force, progress=progress)  # fmt: skip


register_command(Command(
    name="prune",
    help="prune a model: magnitude, Wanda or SparseGPT; unstructured or N:M",
    description="Prune every linear layer of the decoder blocks to the same sparsity (embeddings\n"
    "and the LM head stay dense), layer by layer on calibration windows, then measure\n"
    "perplexity on wiki:eval and write the pruned model and its masks to --out.",
    inputs=(MODEL,),
    sections=(
        Section("method", WandaConfig(), "pruning", family="prune"),
        Section("calib", Calibration(), "calibration data"),
        Section("eval", PerplexityEval(), "evaluation"),
    ),
    run=_prune,
    examples=("optlab prune default --method sparsegpt --pattern 2:4 --out runs/sg24",),
))  # fmt: skip


def _quantize(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    c = job.configs
    return api.quantize(_load(job), c["allocation"], sensitivity=c["sensitivity"],
                        quantizer=c["quantizer"], storage=c["storage"], calib=c["calib"],
                        evaluation=c["eval"], seed=job.seed, out=out, force=force,
                        progress=progress)  # fmt: skip


register_command(Command(
    name="quantize",
    help="mixed-precision weight-only quantization (CPTQuant) with packed weights",
    description="Score each decoder layer's sensitivity on calibration text, give sensitive "
    "layers more\nbits under a budget, quantize every block linear (RTN or GPTQ) into packed "
    "weights\n(int8, two 4-bit per byte, dense 3/2-bit) with fp16 scales and uint8 zero "
    "points, and\nwrite a run: model/ (reload with `optlab eval RUN`), sensitivity.json, "
    "bits.json,\nsensitivity.png, metrics.json (perplexity before/after, size vs FP16).\n"
    "Allocation (exactly one): --avg-bits B | --max-size MB | --tiers 16,8,4 | --uniform B",
    inputs=(MODEL,),
    sections=(
        Section("sensitivity", TDMPQConfig(), "sensitivity", family="sensitivity",
                selector="--sensitivity"),
        Section("allocation", None, "allocation",
                family="allocation", by_flags=True),
        Section("quantizer", RTNConfig(), "quantizer", family="quantizer",
                selector="--quantizer", shortcuts=(("--gptq", "gptq",
                                                    "GPTQ error compensation (= --quantizer "
                                                    "gptq)"),)),
        Section("storage", StorageConfig(), "storage"),
        Section("calib", api.QUANT_CALIB, "calibration data"),
        Section("eval", PerplexityEval(), "evaluation"),
    ),
    run=_quantize,
    examples=("optlab quantize default --sensitivity tdmpq --avg-bits 4.5 --out runs/q45",),
))  # fmt: skip


def _retrain(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.retrain(job.inputs["run"], job.configs["method"], evaluation=job.configs["eval"],
                       seed=job.seed, out=out, force=force, progress=progress)  # fmt: skip


register_command(Command(
    name="retrain",
    help="retrain a pruned run: PERP, full retraining or reconstruction",
    description="Retrain the pruned model of RUN and write a new run. The sparsity mask holds "
    "exactly.\n"
    "  perp          train only --params: bias, norm, head, lora (adapters on every\n"
    "                pruned linear: maskl = W + s(BA*M), scalel = W*(BA), prune, plain)\n"
    "  full          all weights, masks re-applied after every step (the baseline)\n"
    "  reconstruct   block by block, match the dense block's output (PEFT params only)\n"
    "Runs on HF Accelerate: `accelerate launch -m optlab.cli retrain ...` uses many GPUs.",
    inputs=(Input("run", "RUN", "a run directory written by optlab prune"),),
    sections=(
        Section("method", PerpConfig(), "retraining"),
        Section("eval", PerplexityEval(), "evaluation"),
    ),
    run=_retrain,
    examples=("optlab retrain runs/w50 --method perp --steps 200 --out runs/w50-perp",),
))  # fmt: skip


def registered() -> list[Command]:
    """The generated commands, in the order --help lists them."""
    return [COMMANDS.get(name) for name in COMMANDS]
