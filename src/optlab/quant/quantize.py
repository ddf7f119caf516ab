"""``quantize(lm, QuantConfig)``: score layers, allocate bits, quantize, and write a run.

    sensitivity (cmpq | pmpq | tdmpq) -> allocation (--avg-bits | --max-size | --tiers |
    --uniform) -> RTN or GPTQ into packed QuantLinear layers -> run directory with the
    reloadable packed model, sensitivities, bit map, metrics and a plot.

>>> result = quantize_to_run(load_model("default"),
...                          QuantConfig(sensitivity="tdmpq", avg_bits=4.5), "runs/q45")
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optlab.core.anatomy import weight_matrix
from optlab.core.config import config_to_dict
from optlab.core.data import load_text, sample_windows
from optlab.core.layerwise import batched
from optlab.core.models import LoadedModel
from optlab.core.run import Run, peak_memory_gb, seed_everything
from optlab.errors import OptlabError, did_you_mean
from optlab.eval.perplexity import wiki_perplexity
from optlab.eval.scorer import context_length
from optlab.quant.allocate import (
    allocate_budget,
    allocate_tiers,
    allocate_uniform,
    parse_widths,
)
from optlab.quant.apply import quantize_gptq_model, quantize_rtn_model, round_rest
from optlab.quant.embedding import quantize_embeddings
from optlab.quant.linear import QuantLinear, quantized_bytes
from optlab.quant.quantizer import check_bits, resolve_group_size
from optlab.quant.sensitivity import GRANULARITIES, METHODS, sensitivities, sensitivity_units
from optlab.quant.storage import WEIGHTS, save_quantized

log = logging.getLogger("optlab")

REST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "model": None}
HEADER_BYTES_PER_TENSOR = 160  # safetensors JSON header allowance for --max-size


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize. Exactly one of ``avg_bits``, ``max_size_mb``, ``tiers``, ``uniform``.

    ``widths`` are the candidate widths of budgeted allocation (16 = kept in fp16); the
    sensitivity of ``tdmpq`` is measured at the lowest of them. ``group_size`` 0 means per
    output channel. Everything outside the packed linears is stored in ``rest_dtype``.
    """

    sensitivity: str | None = "tdmpq"
    avg_bits: float | None = None
    max_size_mb: float | None = None  # 1 MB = 10^6 bytes, the whole model.safetensors
    tiers: str | None = None  # "16,8,4": the paper's k-means tiering
    uniform: int | None = None
    widths: str = "16,8,4"
    granularity: str = "layer"  # or "linear"
    group_size: int = 128
    gptq: bool = False
    calib: str = "wiki:calib"
    n_calib: int = 32
    seq_len: int | None = 512  # None: the model's context, capped at 2048
    batch_size: int = 8
    damp: float = 0.01
    block_size: int = 128
    prune_fraction: float = 0.3
    cca_dims: int = 8
    rest_dtype: str = "float16"
    embed_bits: int | None = None  # also pack the embeddings and LM head (an extension)
    scores_from: str | None = None  # an earlier run (or its sensitivity.json): skip scoring
    seed: int = 0

    @property
    def error_bits(self) -> int:
        """The lowest candidate width: tdmpq scores each unit's error at it."""
        return min(parse_widths(self.tiers or self.widths))

    def score_settings(self, model: str) -> dict[str, Any]:
        """Everything a sensitivity score depends on: reused scores must match it."""
        own = {"tdmpq": {"error_bits": self.error_bits,
                         "group_size": self.group_size},
               "pmpq": {"prune_fraction": self.prune_fraction},
               "cmpq": {"cca_dims": self.cca_dims}}  # fmt: skip
        return {
            "model": model, "method": self.sensitivity, "granularity": self.granularity,
            "calib": self.calib, "n_calib": self.n_calib, "seq_len": self.seq_len,
            "batch_size": self.batch_size, "seed": self.seed,
            **own.get(str(self.sensitivity), {}),
        }  # fmt: skip

    def validate(self) -> None:
        modes = [self.avg_bits, self.max_size_mb, self.tiers, self.uniform]
        if sum(m is not None for m in modes) != 1:
            raise OptlabError("give exactly one of --avg-bits, --max-size, --tiers, --uniform")
        if self.uniform is None and self.sensitivity not in METHODS:
            raise did_you_mean("sensitivity", str(self.sensitivity), METHODS)
        if self.uniform is not None:
            allocate_uniform([], self.uniform)
        parse_widths(self.widths)
        if self.tiers is not None:
            parse_widths(self.tiers)
        if self.granularity not in GRANULARITIES:
            raise did_you_mean("granularity", self.granularity, GRANULARITIES)
        if self.sensitivity == "cmpq" and self.granularity != "layer" and self.uniform is None:
            raise OptlabError("cmpq scores decoder layers only: drop --per-linear")
        if self.embed_bits is not None:
            check_bits(self.embed_bits)
        if self.rest_dtype not in REST_DTYPES:
            raise did_you_mean("rest dtype", self.rest_dtype, REST_DTYPES)
        if self.group_size < 0 or self.n_calib < 1 or self.batch_size < 1:
            raise OptlabError("group size must be >= 0; n_calib and batch_size positive")
        if self.avg_bits is not None and self.avg_bits <= 0:
            raise OptlabError(f"--avg-bits must be positive, got {self.avg_bits}")
        if self.max_size_mb is not None and self.max_size_mb <= 0:
            raise OptlabError(f"--max-size must be positive, got {self.max_size_mb}")
        if not 0 < self.prune_fraction < 1:
            raise OptlabError(f"prune fraction must be in (0, 1), got {self.prune_fraction}")
        if not 0 <= self.damp < 1:
            raise OptlabError(f"damp must be in [0, 1), got {self.damp}")
        if self.scores_from is not None and self.uniform is not None:
            raise OptlabError("--scores-from reuses sensitivities: --uniform has none")


def reused_scores(config: QuantConfig, model: str, units: list[str]) -> dict[str, float]:
    """The sensitivities of an earlier run (``config.scores_from``: its directory or its
    ``sensitivity.json``), refused unless they were scored the way ``config`` would."""
    path = Path(str(config.scores_from))
    path = path / "sensitivity.json" if path.is_dir() else path
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        settings, scores = saved["settings"], dict(saved["scores"])
    except FileNotFoundError:
        raise OptlabError(f"no sensitivities at {path}: pass a quantize run or its "
                          "sensitivity.json") from None  # fmt: skip
    except (json.JSONDecodeError, KeyError, TypeError):
        raise OptlabError(f"{path} is not a sensitivity.json of optlab quantize with the "
                          "settings of its scores") from None  # fmt: skip
    wanted = config.score_settings(model)
    differ = [f"{k}: {settings.get(k)!r} there, {v!r} here" for k, v in wanted.items()
              if settings.get(k) != v]  # fmt: skip
    if differ:
        raise OptlabError(f"{path} was scored differently; " + "; ".join(differ))
    if sorted(scores) != sorted(units):
        raise OptlabError(f"{path} scores other units than this model's")
    return {unit: float(scores[unit]) for unit in units}


def _shape(model: nn.Module, name: str) -> tuple[int, int]:
    out, inp = weight_matrix(model.get_submodule(name)).shape
    return out, inp


def allocate(
    model: nn.Module,
    config: QuantConfig,
    units: dict[str, list[str]],
    scores: dict[str, float] | None,
) -> dict[str, int]:
    """Bits per unit under the configured rule (budget, tiers or uniform)."""
    if config.uniform is not None:
        return allocate_uniform(list(units), config.uniform)
    assert scores is not None
    if config.tiers is not None:
        return allocate_tiers(scores, parse_widths(config.tiers), config.seed)
    widths = parse_widths(config.widths)
    shapes = {name: _shape(model, name) for names in units.values() for name in names}
    if config.avg_bits is not None:
        counts = {
            u: sum(o * i for o, i in (shapes[n] for n in names)) for u, names in units.items()
        }
        return allocate_budget(scores, counts, widths, config.avg_bits * sum(counts.values()))

    def cost(unit: str, bits: int) -> float:
        return sum(quantized_bytes(o, i, bits, resolve_group_size(config.group_size, i))
                   for o, i in (shapes[n] for n in units[unit]))  # fmt: skip

    targeted = {f"{n}.weight" for names in units.values() for n in names}
    tensors = len(model.state_dict()) + 2 * len(targeted)  # packed, scales, zeros per linear
    packed_tables = 0
    if config.embed_bits is not None:
        tables = {m.weight.data_ptr(): m.weight for m in _embedding_modules(model)}
        targeted |= {k for k, v in model.state_dict().items() if v.data_ptr() in tables}
        tensors += 2 * len(tables)
        for table in tables.values():
            num, dim = table.shape
            size = resolve_group_size(config.group_size, dim)
            packed_tables += quantized_bytes(num, dim, config.embed_bits, size)
    rest = rest_bytes(model, targeted, REST_DTYPES[config.rest_dtype]) + packed_tables
    budget = config.max_size_mb * 1e6 - rest - 8 - HEADER_BYTES_PER_TENSOR * tensors
    if budget <= 0:
        raise OptlabError(f"--max-size {config.max_size_mb} MB is below the unquantized part of "
                          f"the model alone ({rest / 1e6:.3f} MB)")  # fmt: skip
    return allocate_budget(scores, cost, widths, budget)


def _embedding_modules(model: nn.Module) -> list[nn.Module]:
    head = model.get_output_embeddings()
    return [model.get_input_embeddings(), *([head] if head is not None else [])]


def rest_bytes(model: nn.Module, skip: set[str], dtype: torch.dtype | None) -> int:
    """Bytes of every saved tensor (shared ones once) except the state keys in ``skip``."""
    total, seen = 0, set()
    for key, tensor in model.state_dict().items():
        if key in skip or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        size = dtype.itemsize if dtype is not None and tensor.is_floating_point() else None
        total += tensor.numel() * (size or tensor.element_size())
    return total


def quantize(lm: LoadedModel, config: QuantConfig, *, progress: bool = True) -> dict[str, Any]:
    """Quantize ``lm.model`` in place; return sensitivities, bits per unit and per linear."""
    config.validate()
    model = lm.model
    start = time.perf_counter()
    units = sensitivity_units(model, config.granularity)
    seq_len = config.seq_len or context_length(model)
    windows: list[torch.Tensor] = []
    scoring = config.uniform is None and config.scores_from is None
    if scoring or config.gptq:  # plain RTN with known scores needs no calibration
        windows = batched(
            sample_windows(lm.tokenizer, load_text(config.calib), config.n_calib, seq_len,
                           config.seed), config.batch_size)  # fmt: skip
    scores = None
    if config.scores_from is not None:
        scores = reused_scores(config, lm.spec, list(units))
        log.info("reusing the %s sensitivities of %s", config.sensitivity, config.scores_from)
    elif scoring:
        log.info("scoring %d units with %s", len(units), config.sensitivity)
        scores = sensitivities(
            model, config.sensitivity, windows, units, bits=config.error_bits,
            group_size=config.group_size, prune_fraction=config.prune_fraction,
            cca_dims=config.cca_dims,
        )  # fmt: skip
    unit_bits = allocate(model, config, units, scores)
    linear_bits = {name: unit_bits[u] for u, names in units.items() for name in names}
    sensitivity_seconds = time.perf_counter() - start
    counts = {name: _shape(model, name)[0] * _shape(model, name)[1] for name in linear_bits}
    if config.gptq:
        quantize_gptq_model(model, linear_bits, windows, config.group_size, damp=config.damp,
                            block_size=config.block_size, progress=progress)  # fmt: skip
    else:
        quantize_rtn_model(model, linear_bits, config.group_size)
    embeddings = None
    if config.embed_bits is not None:
        embeddings = quantize_embeddings(model, config.embed_bits, config.group_size)
    round_rest(model, REST_DTYPES[config.rest_dtype])
    weights = sum(counts.values())
    stored = sum(
        m.storage_bytes() if isinstance(m, QuantLinear) else 2 * counts[n]
        for n, m in ((n, model.get_submodule(n)) for n in linear_bits)
    )
    kernels: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            kernels[module.kernel_name()] = kernels.get(module.kernel_name(), 0) + 1
    return {
        "sensitivity": scores,
        "unit_bits": unit_bits,
        "linear_bits": linear_bits,
        "avg_bits": sum(counts[n] * b for n, b in linear_bits.items()) / weights,
        # scales and zero points included: what the targeted weights really cost per weight
        "effective_bits": 8 * stored / weights,
        "kernels": kernels,
        "embeddings": embeddings,
        "sensitivity_seconds": sensitivity_seconds,
        "quantize_seconds": time.perf_counter() - start - sensitivity_seconds,
    }


def plot_sensitivity(path: Path, scores: dict[str, float] | None, bits: dict[str, int]) -> None:
    """Bar charts of sensitivity and bits per unit, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(bits)
    rows = 2 if scores is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(max(6, 0.3 * len(names)), 2.6 * rows),
                             sharex=True, squeeze=False)  # fmt: skip
    if scores is not None:
        axes[0, 0].bar(range(len(names)), [scores[n] for n in names], color="tab:red")
        axes[0, 0].set_ylabel("sensitivity")
    axes[-1, 0].bar(range(len(names)), [bits[n] for n in names], color="tab:blue")
    axes[-1, 0].set_ylabel("bits")
    axes[-1, 0].set_xlabel("unit (decoder layer or linear, in order)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def quantize_to_run(
    lm: LoadedModel,
    config: QuantConfig,
    out: str | Path,
    *,
    force: bool = False,
    eval_seq_len: int | None = None,
    eval_limit: int | None = None,
    evaluate: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize and write a run: ``model/`` (packed, reloadable with ``load_model(run)``),
    ``sensitivity.json``, ``bits.json``, ``sensitivity.png`` and ``metrics.json`` with
    perplexity before/after, average bits, real file size and compression against FP16."""
    config.validate()
    run_config = {"command": "quantize", "model": lm.spec, **config_to_dict(config)}
    with Run(out, config=run_config, seed=config.seed, device=str(lm.device),
             dtype=str(next(lm.model.parameters()).dtype), force=force) as run:  # fmt: skip
        seed_everything(config.seed)
        seq_len = eval_seq_len or config.seq_len
        parameters = sum(p.numel() for p in lm.model.parameters())
        metrics: dict[str, Any] = {"fp16_bytes": 2 * parameters}
        if evaluate:
            metrics["perplexity_before"] = wiki_perplexity(lm, seq_len, eval_limit, progress)
        result = quantize(lm, config, progress=progress)
        if evaluate:
            metrics["perplexity_after"] = wiki_perplexity(lm, seq_len, eval_limit, progress)
        save_quantized(lm, run.dir / "model", result["linear_bits"], config.group_size,
                       REST_DTYPES[config.rest_dtype], result["embeddings"])  # fmt: skip
        file_bytes = (run.dir / "model" / WEIGHTS).stat().st_size
        run.save_json("sensitivity.json", {"method": config.sensitivity,
                                           "granularity": config.granularity,
                                           "settings": config.score_settings(lm.spec),
                                           "scores": result["sensitivity"]})  # fmt: skip
        run.save_json("bits.json", {"units": result["unit_bits"],
                                    "linears": result["linear_bits"]})  # fmt: skip
        plot_sensitivity(run.dir / "sensitivity.png", result["sensitivity"], result["unit_bits"])
        metrics.update({
            "bits_per_unit": result["unit_bits"],
            "avg_bits": result["avg_bits"],
            "effective_bits": result["effective_bits"],
            "file_bytes": file_bytes,
            "file_mb": file_bytes / 1e6,
            "compression_vs_fp16": metrics["fp16_bytes"] / file_bytes,
            "file_bits_per_parameter": 8 * file_bytes / parameters,
            "embeddings": result["embeddings"],
            "kernels": result["kernels"],
            "sensitivity_seconds": result["sensitivity_seconds"],
            "quantize_seconds": result["quantize_seconds"],
        })  # fmt: skip
        if config.max_size_mb is not None and file_bytes > config.max_size_mb * 1e6:
            raise RuntimeError(f"{file_bytes} bytes written, over --max-size")  # a bug, not user
        metrics.update(peak_memory_gb())
        run.add_metrics(metrics)
    log.info("quantized model (%.3f avg bits, %.2fx vs fp16) written to %s",
             metrics["avg_bits"], metrics["compression_vs_fp16"], run.path)  # fmt: skip
    return {**metrics, "run": str(run.path)}


__all__ = ["QuantConfig", "allocate", "quantize", "quantize_to_run"]
