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

import numpy as np
import torch
from torch import nn

from optlab.core.anatomy import weight_matrix
from optlab.core.calibration import Calibration
from optlab.core.config import (
    METHODS,
    configurable,
    option,
    require,
    require_finite,
    require_positive,
)
from optlab.core.files import read_json_object
from optlab.core.models import GGUF_RUN_FILE, LoadedModel, require_finite_weights
from optlab.errors import OptlabError, did_you_mean
from optlab.quant.allocate import (
    allocate_budget,
    allocate_tiers,
    allocate_uniform,
    parse_widths,
)
from optlab.quant.apply import quantize_gptq_model, quantize_rtn_model, round_rest
from optlab.quant.embedding import quantize_embeddings
from optlab.quant.gguf_export import GGUFPlan
from optlab.quant.gguf_types import LADDER, bits_per_weight, decode, encode, gguf_type
from optlab.quant.gguf_types import TYPES as GGUF_TYPES
from optlab.quant.linear import QuantLinear, quantized_bytes
from optlab.quant.quantizer import check_bits, resolve_group_size
from optlab.quant.sensitivity import sensitivities, sensitivity_units
from optlab.quant.storage import WEIGHTS, save_quantized

log = logging.getLogger("optlab")

REST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "model": None}
HEADER_BYTES_PER_TENSOR = 160  # safetensors JSON header allowance for --max-size


# --- sensitivities: how much each unit (decoder layer or linear) matters -------------------


@dataclass(frozen=True)
class _Sensitivity:
    per_linear: bool = option(False, "one width per linear instead of per decoder layer")
    scores_from: str | None = option(None, "reuse the sensitivities of an earlier quantize run "
                                     "scored the same way (allocate another budget without "
                                     "scoring again)", metavar="RUN")  # fmt: skip

    @property
    def granularity(self) -> str:
        return "linear" if self.per_linear else "layer"

    def own_settings(self) -> dict[str, Any]:
        """The knobs a score depends on besides the shared ones (see ``score_settings``)."""
        return {}


@configurable("cmpq")
@dataclass(frozen=True)
class CMPQConfig(_Sensitivity):
    """1 - mean canonical correlation of a layer's pooled states with every other layer's."""

    cca_dims: int = option(8, "principal components per layer before the CCA; 0 = raw states")

    def __post_init__(self) -> None:
        require(isinstance(self.cca_dims, int) and self.cca_dims >= 0,
                f"cca_dims must be a whole number >= 0, got {self.cca_dims!r}")  # fmt: skip
        require(not self.per_linear, "cmpq scores decoder layers only: drop --per-linear")

    def own_settings(self) -> dict[str, Any]:
        return {"cca_dims": self.cca_dims}


@configurable("pmpq")
@dataclass(frozen=True)
class PMPQConfig(_Sensitivity):
    """Perplexity increase when only that unit's smallest weights are zeroed."""

    prune_fraction: float = option(0.3, "fraction of the unit's smallest weights zeroed")

    def __post_init__(self) -> None:
        require_finite(self, "prune_fraction")
        require(0 < self.prune_fraction < 1, "prune fraction must be in (0, 1), got "
                f"{self.prune_fraction}")  # fmt: skip

    def own_settings(self) -> dict[str, Any]:
        return {"prune_fraction": self.prune_fraction}


@configurable("tdmpq")
@dataclass(frozen=True)
class TDMPQConfig(_Sensitivity):
    """Taylor estimate |g.d| + 1/2 mean_b (g_b.d)^2 of the loss change under the unit's
    quantization error d at the lowest candidate width."""


SensitivityConfig = CMPQConfig | PMPQConfig | TDMPQConfig
METHODS.register("sensitivity", CMPQConfig, "1 - mean canonical correlation (1-component CCA) of "
                 "a layer's pooled states with the others")  # fmt: skip
METHODS.register("sensitivity", PMPQConfig, "perplexity increase when 30% of the unit's "
                 "smallest weights are zeroed")  # fmt: skip
METHODS.register("sensitivity", TDMPQConfig, "Taylor: |g.d| + 1/2 mean_b (g_b.d)^2, d = the "
                 "unit's quantization error")  # fmt: skip


# --- allocation: exactly one rule gives each unit its bits ---------------------------------

WIDTHS_HELP = "candidate widths (16 = kept in fp16); add 3,2 for budgets under 4"


def _check_widths(widths: str) -> None:
    parse_widths(widths)


@configurable("avg-bits")
@dataclass(frozen=True)
class AvgBitsConfig:
    """At most ``avg_bits`` bits per targeted weight on average, solved as a knapsack."""

    avg_bits: float | None = option(None, "average bits per targeted weight (--format gguf: "
                                    "file bits per parameter, everything counted)",
                                    flag="--avg-bits", metavar="B")  # fmt: skip
    widths: str = option("16,8,4", WIDTHS_HELP)

    def __post_init__(self) -> None:
        require(self.avg_bits is not None, "avg-bits allocation needs avg_bits (--avg-bits B)")
        require_finite(self, "avg_bits")
        require(self.avg_bits > 0, f"--avg-bits must be positive, got {self.avg_bits}")  # type: ignore[operator]
        _check_widths(self.widths)
        top = max(parse_widths(self.widths))
        if self.avg_bits >= top:  # type: ignore[operator]
            log.warning(
                "--avg-bits %g is at or above the widest width %d: every unit gets %d "
                "bits, so the sensitivities decide nothing",
                self.avg_bits,
                top,
                top,
            )


@configurable("max-size")
@dataclass(frozen=True)
class MaxSizeConfig:
    """The written model file (``model.safetensors``, or ``model.gguf`` with ``--format
    gguf``) at most ``max_size_mb`` MB (10^6 bytes)."""

    max_size_mb: float | None = option(None, "the model file at most MB (10^6 bytes)",
                                       flag="--max-size", metavar="MB")  # fmt: skip
    widths: str = option("16,8,4", WIDTHS_HELP)

    def __post_init__(self) -> None:
        require(self.max_size_mb is not None, "max-size allocation needs --max-size MB")
        require_finite(self, "max_size_mb")
        require(self.max_size_mb > 0, f"--max-size must be positive, got {self.max_size_mb}")  # type: ignore[operator]
        _check_widths(self.widths)


@configurable("tiers")
@dataclass(frozen=True)
class TiersConfig:
    """The paper's rule: k-means of the sensitivities, the highest centroid the most bits."""

    tiers: str | None = option(None, "k-means tiers, e.g. 16,8,4", metavar="W1,W2,...")

    def __post_init__(self) -> None:
        require(self.tiers is not None, "tiers allocation needs --tiers, e.g. 16,8,4")
        _check_widths(str(self.tiers))

    @property
    def widths(self) -> str:
        return str(self.tiers)


@configurable("uniform")
@dataclass(frozen=True)
class UniformConfig:
    """Every unit at the same width (the baseline; no sensitivities needed)."""

    uniform: int | None = option(None, "every layer at B bits (baseline)", metavar="B")

    def __post_init__(self) -> None:
        require(self.uniform is not None, "uniform allocation needs --uniform B")
        allocate_uniform([], self.uniform)  # type: ignore[arg-type]

    @property
    def widths(self) -> str:
        return str(self.uniform)


AllocationConfig = AvgBitsConfig | MaxSizeConfig | TiersConfig | UniformConfig
METHODS.register("allocation", AvgBitsConfig, "average bits per targeted weight, never exceeded")
METHODS.register("allocation", MaxSizeConfig, "the model file at most MB")
METHODS.register("allocation", TiersConfig, "k-means tiers (the paper's rule)")
METHODS.register("allocation", UniformConfig, "every unit at B bits (baseline)")


# --- quantizers: how a linear becomes packed codes ------------------------------------------


@dataclass(frozen=True)
class _Grid:
    group_size: int = option(128, "columns per scale; 0 = per output channel")

    def __post_init__(self) -> None:
        require(isinstance(self.group_size, int) and self.group_size >= 0,
                f"group size must be a whole number >= 0, got {self.group_size!r}")  # fmt: skip


@configurable("rtn")
@dataclass(frozen=True)
class RTNConfig(_Grid):
    """Asymmetric round-to-nearest per group of columns."""


@configurable("gptq")
@dataclass(frozen=True)
class GPTQConfig(_Grid):
    """GPTQ: round column by column, compensating the error on the columns not yet rounded."""

    damp: float = option(0.01, "Hessian damping, a fraction of its mean diagonal")
    block_size: int = option(128, "columns rounded and compensated together")
    act_order: bool = option(False, "round columns by decreasing Hessian diagonal (the "
                             "official --act-order; with groups, their grids are fitted up "
                             "front, as its --static-groups)")  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self, "block_size")
        require_finite(self, "damp")
        require(0 <= self.damp < 1, f"damp must be in [0, 1), got {self.damp}")


QuantizerConfig = RTNConfig | GPTQConfig
METHODS.register("quantizer", RTNConfig, "round to nearest (asymmetric, per group)")
METHODS.register("quantizer", GPTQConfig, "GPTQ error compensation (Frantar et al. 2022)")


@configurable("storage")
@dataclass(frozen=True)
class StorageConfig:
    """How the model is stored: optlab's packed safetensors, or a GGUF file."""

    rest_dtype: str = option("float16", "storage of unquantized tensors (optlab format)",
                             choices=tuple(REST_DTYPES))  # fmt: skip
    embed_bits: int | None = option(None, "also pack embeddings + LM head at 8/4/3/2 bits "
                                    "(optlab format; default fp16)", metavar="B")  # fmt: skip
    format: str = option("optlab", "the run's model: optlab (packed model/) or gguf (one "
                         "model.gguf; the allocation picks GGUF types under a byte budget)",
                         choices=("optlab", "gguf"))  # fmt: skip
    gguf_types: str = option(",".join(LADDER), "with --format gguf: the GGUF types a unit may "
                             "get", metavar="T1,T2,...")  # fmt: skip
    embed_type: str = option("q8_0", "with --format gguf: the embeddings' and head's type",
                             choices=tuple(GGUF_TYPES))  # fmt: skip

    def __post_init__(self) -> None:
        if self.rest_dtype not in REST_DTYPES:
            raise did_you_mean("rest dtype", self.rest_dtype, REST_DTYPES)
        if self.embed_bits is not None:
            check_bits(self.embed_bits)
        if self.format not in ("optlab", "gguf"):
            raise did_you_mean("storage format", self.format, ("optlab", "gguf"))
        gguf_ladder(self.gguf_types)
        gguf_type(self.embed_type)
        require(self.format == "optlab" or self.embed_bits is None,
                "--embed-bits packs optlab's format; with --format gguf: --embed-type")  # fmt: skip


def gguf_ladder(text: str) -> tuple[str, ...]:
    """``"q8_0,q4_1"`` -> the GGUF types, widest first (distinct sizes: a unit's bits per
    weight name its type)."""
    names = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    for name in names:
        gguf_type(name)
    sizes = [bits_per_weight(n) for n in names]
    if not names or len(set(sizes)) != len(sizes):
        raise OptlabError(f"bad --gguf-types {text!r}: distinct GGUF types of distinct sizes, "
                          f"e.g. {','.join(LADDER)}")  # fmt: skip
    return tuple(sorted(names, key=bits_per_weight, reverse=True))


def error_bits(allocation: AllocationConfig) -> int:
    """The lowest candidate width: tdmpq scores each unit's error at it."""
    return min(parse_widths(allocation.widths))


def gguf_rounder(name: str) -> Any:
    """w -> the weight GGUF type ``name`` stores (its reference rounding, then decoded)."""

    def rounded(weight: torch.Tensor) -> torch.Tensor:
        values = decode(encode(weight, name), name).reshape(weight.shape)
        return torch.from_numpy(values).to(weight.device)

    return rounded


def score_settings(
    sensitivity: SensitivityConfig,
    allocation: AllocationConfig,
    quantizer: QuantizerConfig,
    calib: Calibration | torch.Tensor,
    seed: int,
    model: str,
    storage: StorageConfig | None = None,
) -> dict[str, Any]:
    """Everything a sensitivity score depends on: reused scores must match it."""
    own = sensitivity.own_settings()
    if isinstance(sensitivity, TDMPQConfig) and storage is not None and storage.format == "gguf":
        own = {"error_type": gguf_ladder(storage.gguf_types)[-1]}
    elif isinstance(sensitivity, TDMPQConfig):
        own = {"error_bits": error_bits(allocation), "group_size": quantizer.group_size}
    if isinstance(calib, torch.Tensor):  # windows given in Python: only their shape is known
        data = {"calib": "given in Python", "n_calib": calib.shape[0], "seq_len": calib.shape[1]}
    else:
        data = {"calib": calib.corpus, "n_calib": calib.n, "seq_len": calib.seq_len,
                "batch_size": calib.batch_size}  # fmt: skip
    return {"model": model, "method": sensitivity.TYPE, "granularity": sensitivity.granularity,
            **data, "seed": seed, **own}  # fmt: skip


def reused_scores(source: str, wanted: dict[str, Any], units: list[str]) -> dict[str, float]:
    """The sensitivities of an earlier run (``source``: its directory or its
    ``sensitivity.json``), refused unless they were scored with the settings ``wanted``."""
    path = Path(source)
    path = path / "sensitivity.json" if path.is_dir() else path
    if not path.exists():
        raise OptlabError(f"no sensitivities at {path}: pass a quantize run or its "
                          "sensitivity.json")  # fmt: skip
    not_ours = (f"{path} is not a sensitivity.json of optlab quantize with the settings of "
                "its scores")  # fmt: skip
    saved = read_json_object(path, "--scores-from file", hint=f"; {not_ours}")
    try:
        settings, scores = dict(saved["settings"]), dict(saved["scores"])
    except (KeyError, TypeError, ValueError):
        raise OptlabError(not_ours) from None
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
    allocation: AllocationConfig,
    units: dict[str, list[str]],
    scores: dict[str, float] | None,
    *,
    group_size: int = 128,
    storage: StorageConfig | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Bits per unit under the allocation rule (budget, tiers or uniform)."""
    storage = storage or StorageConfig()
    if isinstance(allocation, UniformConfig):
        return allocate_uniform(list(units), int(allocation.uniform))  # type: ignore[arg-type]
    if scores is None:
        raise OptlabError(f"{allocation.TYPE} allocation needs sensitivities")  # type: ignore[union-attr]
    if isinstance(allocation, TiersConfig):
        return allocate_tiers(scores, parse_widths(allocation.widths), seed)
    widths = parse_widths(allocation.widths)
    shapes = {name: _shape(model, name) for names in units.values() for name in names}
    if isinstance(allocation, AvgBitsConfig):
        counts = {
            u: sum(o * i for o, i in (shapes[n] for n in names)) for u, names in units.items()
        }
        budget_bits = float(allocation.avg_bits) * sum(counts.values())  # type: ignore[arg-type]
        return allocate_budget(scores, counts, widths, budget_bits)

    def cost(unit: str, bits: int) -> float:
        return sum(quantized_bytes(o, i, bits, resolve_group_size(group_size, i))
                   for o, i in (shapes[n] for n in units[unit]))  # fmt: skip

    targeted = {f"{n}.weight" for names in units.values() for n in names}
    tensors = len(model.state_dict()) + 2 * len(targeted)  # packed, scales, zeros per linear
    packed_tables = 0
    if storage.embed_bits is not None:
        tables = {m.weight.data_ptr(): m.weight for m in _embedding_modules(model)}
        targeted |= {k for k, v in model.state_dict().items() if v.data_ptr() in tables}
        tensors += 2 * len(tables)
        for table in tables.values():
            num, dim = table.shape
            size = resolve_group_size(group_size, dim)
            packed_tables += quantized_bytes(num, dim, storage.embed_bits, size)
    rest = rest_bytes(model, targeted, REST_DTYPES[storage.rest_dtype]) + packed_tables
    limit = float(allocation.max_size_mb)  # type: ignore[arg-type]
    budget = limit * 1e6 - rest - 8 - HEADER_BYTES_PER_TENSOR * tensors
    if budget <= 0:
        raise OptlabError(f"--max-size {limit} MB is below the unquantized part of "
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


def check_gguf_format(
    allocation: AllocationConfig, quantizer: QuantizerConfig, storage: StorageConfig
) -> None:
    """Refuse, before any work, what ``--format gguf`` cannot do."""
    if storage.format != "gguf":
        return
    if not isinstance(allocation, AvgBitsConfig | MaxSizeConfig):
        raise OptlabError("--format gguf allocates GGUF types under a byte budget: give "
                          "--max-size MB or --avg-bits B (for one type everywhere: optlab "
                          "export --type T)")  # fmt: skip
    if allocation.widths != AvgBitsConfig.widths:
        raise OptlabError("--widths are optlab's packed widths; with --format gguf give the "
                          f"types as --gguf-types, e.g. {','.join(LADDER)}")  # fmt: skip
    if isinstance(quantizer, GPTQConfig):
        raise OptlabError("--format gguf rounds each layer by its GGUF type's own rule; "
                          "GPTQ compensation is for optlab's format")  # fmt: skip


def gguf_budget(plan: GGUFPlan, allocation: AllocationConfig) -> int:
    """The file's byte budget: --max-size MB, or --avg-bits B per parameter (all tensors)."""
    if isinstance(allocation, MaxSizeConfig):
        return int(float(allocation.max_size_mb) * 1e6)  # type: ignore[arg-type]
    parameters = sum(int(np.prod(slot.shape)) for slot in plan.slots)
    return int(float(allocation.avg_bits) * parameters / 8)  # type: ignore[arg-type]


def allocate_gguf(
    plan: GGUFPlan,
    units: dict[str, list[str]],
    scores: dict[str, float],
    ladder: tuple[str, ...],
    max_bytes: int,
) -> dict[str, str]:
    """A GGUF type per unit so that the whole file is at most ``max_bytes``: the knapsack of
    :func:`allocate_budget` over the types' bits per weight, costed in the file's own bytes
    (blocks, padding, metadata and every other tensor included)."""
    slot_of = {slot.key.removesuffix(".weight"): slot for slot in plan.slots}
    members = {name for names in units.values() for name in names}
    fixed = plan.fixed_bytes() + sum(plan.tensor_bytes(s) for n, s in slot_of.items()
                                     if n not in members)  # fmt: skip
    type_of = {bits_per_weight(t): t for t in ladder}

    def cost(unit: str, bpw: float) -> float:
        return sum(plan.tensor_bytes(slot_of[name], type_of[bpw]) for name in units[unit])

    smallest = fixed + sum(cost(u, min(type_of)) for u in units)
    if max_bytes < smallest:
        raise OptlabError(f"a {max_bytes / 1e6:.6f} MB budget is below the smallest file, "
                          f"{smallest / 1e6:.6f} MB (every unit at {ladder[-1]}; metadata, "
                          "embeddings and norms take {:.6f} MB): raise the budget or give "
                          "smaller --gguf-types / --embed-type".format(fixed / 1e6))  # fmt: skip
    chosen = allocate_budget(scores, cost, list(type_of), max_bytes - fixed)
    return {unit: type_of[bpw] for unit, bpw in chosen.items()}


def quantize_gguf(
    lm: LoadedModel,
    allocation: AllocationConfig,
    sensitivity: SensitivityConfig,
    storage: StorageConfig,
    *,
    windows: list[torch.Tensor] | None = None,
    scores: dict[str, float] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score units, give each a GGUF type under the file's byte budget, and round every
    tensor as the file stores it (the model then computes exactly what the file holds)."""
    model = lm.model
    start = time.perf_counter()
    ladder = gguf_ladder(storage.gguf_types)
    units = sensitivity_units(model, sensitivity.granularity)
    if scores is None:
        if windows is None:
            raise OptlabError(f"{sensitivity.TYPE} sensitivities need calibration windows")
        log.info("scoring %d units with %s", len(units), sensitivity.TYPE)
        scores = sensitivities(model, sensitivity.TYPE, windows, units,
                               rounder=gguf_rounder(ladder[-1]),
                               **sensitivity.own_settings())  # fmt: skip
    plan = GGUFPlan(lm, embed_type=storage.embed_type)
    max_bytes = gguf_budget(plan, allocation)
    unit_types = allocate_gguf(plan, units, scores, ladder, max_bytes)
    linear_types = {name: unit_types[u] for u, names in units.items() for name in names}
    sensitivity_seconds = time.perf_counter() - start
    plan = GGUFPlan(lm, embed_type=storage.embed_type, linear_types=linear_types)
    plan.encode(apply=True, progress=progress)
    counts = {name: _shape(model, name)[0] * _shape(model, name)[1] for name in linear_types}
    weights = sum(counts.values())
    stored_bits = sum(counts[n] * bits_per_weight(t) for n, t in linear_types.items())
    return {
        "sensitivity": scores,
        "unit_bits": {u: bits_per_weight(t) for u, t in unit_types.items()},
        "unit_types": unit_types,
        "linear_types": linear_types,
        "linear_bits": {n: bits_per_weight(t) for n, t in linear_types.items()},
        "avg_bits": stored_bits / weights,  # a GGUF type's size includes its scales
        "effective_bits": stored_bits / weights,
        "budget_bytes": max_bytes,
        "predicted_file_bytes": plan.predicted_bytes(),
        "kernels": {},
        "embeddings": None,
        "plan": plan,
        "sensitivity_seconds": sensitivity_seconds,
        "quantize_seconds": time.perf_counter() - start - sensitivity_seconds,
    }


def quantize(
    lm: LoadedModel,
    allocation: AllocationConfig,
    *,
    sensitivity: SensitivityConfig | None = None,
    quantizer: QuantizerConfig | None = None,
    storage: StorageConfig | None = None,
    windows: list[torch.Tensor] | None = None,
    scores: dict[str, float] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize ``lm.model`` in place: score each unit on the calibration ``windows`` (batches
    of token ids; not needed with ``scores`` given or a uniform width, nor for RTN), give it
    bits under ``allocation``, and replace every block linear by a packed ``QuantLinear``.
    Returns sensitivities, bits per unit and per linear, and the real cost in bits."""
    sensitivity = sensitivity or TDMPQConfig()
    quantizer = quantizer or RTNConfig()
    storage = storage or StorageConfig()
    model = lm.model
    require_finite_weights(model, "quantize")  # NaN sensitivities would misallocate bits
    if storage.format == "gguf":
        check_gguf_format(allocation, quantizer, storage)
        return quantize_gguf(lm, allocation, sensitivity, storage, windows=windows,
                             scores=scores, progress=progress)  # fmt: skip
    start = time.perf_counter()
    units = sensitivity_units(model, sensitivity.granularity)
    if scores is None and not isinstance(allocation, UniformConfig):
        if windows is None:
            raise OptlabError(f"{sensitivity.TYPE} sensitivities need calibration windows")
        log.info("scoring %d units with %s", len(units), sensitivity.TYPE)
        scores = sensitivities(
            model, sensitivity.TYPE, windows, units, bits=error_bits(allocation),
            group_size=quantizer.group_size, **sensitivity.own_settings(),
        )  # fmt: skip
    unit_bits = allocate(model, allocation, units, scores, group_size=quantizer.group_size,
                         storage=storage, seed=seed)  # fmt: skip
    linear_bits = {name: unit_bits[u] for u, names in units.items() for name in names}
    sensitivity_seconds = time.perf_counter() - start
    counts = {name: _shape(model, name)[0] * _shape(model, name)[1] for name in linear_bits}
    if isinstance(quantizer, GPTQConfig):
        if windows is None:
            raise OptlabError("GPTQ needs calibration windows")
        quantize_gptq_model(model, linear_bits, windows, quantizer.group_size,
                            damp=quantizer.damp, block_size=quantizer.block_size,
                            act_order=quantizer.act_order, progress=progress)  # fmt: skip
    else:
        quantize_rtn_model(model, linear_bits, quantizer.group_size)
    embeddings = None
    if storage.embed_bits is not None:
        embeddings = quantize_embeddings(model, storage.embed_bits, quantizer.group_size)
    round_rest(model, REST_DTYPES[storage.rest_dtype])
    weights = sum(counts.values())
    stored = sum(
        m.storage_bytes() if isinstance(m, QuantLinear) else 2 * counts[n]
        for n, m in ((n, model.get_submodule(n)) for n in linear_bits)
    )
    kernels: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            name = module.kernel_name(compiled=True)  # a compiled one-row decoding step
            kernels[name] = kernels.get(name, 0) + 1
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


def needs_windows(
    allocation: AllocationConfig, sensitivity: SensitivityConfig, quantizer: QuantizerConfig
) -> bool:
    """Whether calibration data is read: to score (unless reused or uniform) or for GPTQ."""
    scoring = not isinstance(allocation, UniformConfig) and sensitivity.scores_from is None
    return scoring or isinstance(quantizer, GPTQConfig)


def save_run(
    run_dir: Path,
    lm: LoadedModel,
    result: dict[str, Any],
    quantizer: QuantizerConfig,
    storage: StorageConfig,
    settings: dict[str, Any],
    method: str | None,
    granularity: str,
) -> dict[str, Any]:
    """Write the model (packed ``model/``, or ``model.gguf``), sensitivity.json, bits.json
    and the plot; return the size metrics (real file bytes, compression against fp16)."""
    if storage.format == "gguf":
        result["plan"].write(run_dir / GGUF_RUN_FILE, progress=False)
        file_bytes = (run_dir / GGUF_RUN_FILE).stat().st_size
        if file_bytes != result["predicted_file_bytes"]:
            raise RuntimeError(f"wrote {file_bytes} bytes, the allocation predicted "
                               f"{result['predicted_file_bytes']}")  # fmt: skip
    else:
        save_quantized(lm, run_dir / "model", result["linear_bits"], quantizer.group_size,
                       REST_DTYPES[storage.rest_dtype], result["embeddings"])  # fmt: skip
        file_bytes = (run_dir / "model" / WEIGHTS).stat().st_size
    (run_dir / "sensitivity.json").write_text(json.dumps(
        {"method": method, "granularity": granularity, "settings": settings,
         "scores": result["sensitivity"]}, indent=2) + "\n")  # fmt: skip
    widths = {"units": result["unit_bits"], "linears": result["linear_bits"]}
    if storage.format == "gguf":  # the types, and their bits per weight
        widths |= {"unit_types": result["unit_types"], "linear_types": result["linear_types"]}
    (run_dir / "bits.json").write_text(json.dumps(widths, indent=2) + "\n")
    plot_sensitivity(run_dir / "sensitivity.png", result["sensitivity"], result["unit_bits"])
    return {"file_bytes": file_bytes, "file_mb": file_bytes / 1e6}


__all__ = [
    "AvgBitsConfig", "CMPQConfig", "GPTQConfig", "MaxSizeConfig", "PMPQConfig", "RTNConfig",
    "StorageConfig", "TDMPQConfig", "TiersConfig", "UniformConfig", "allocate", "quantize",
]  # fmt: skip
