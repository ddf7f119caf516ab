"""Compression: ``prune``, ``quantize``, ``retrain`` and ``export``."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from optlab.api._base import data_record, execute_job, job_of, resolve_model, windows_of
from optlab.core.calibration import Calibration
from optlab.core.files import read_json_object
from optlab.core.job import Result
from optlab.core.layerwise import batched
from optlab.core.models import GGUF_RUN_FILE, LoadedModel, load_model, require_finite_weights
from optlab.core.run import Run, peak_memory_gb
from optlab.errors import OptlabError
from optlab.eval.perplexity import PerplexityEval
from optlab.eval.scorer import window_length
from optlab.pruning import pruner
from optlab.pruning.masks import save_sparse_model
from optlab.pruning.pruner import PruneMethodConfig
from optlab.quant import quantize as quant
from optlab.quant.gguf_export import ExportConfig, export_gguf
from optlab.retraining import perp
from optlab.retraining.job import source_run
from optlab.retraining.perp import PerpConfig

log = logging.getLogger("optlab")


QUANT_CALIB = Calibration(n=32, seq_len=512)  # CPTQuant's calibration: 32 windows of 512


def prune(
    model: LoadedModel | str | Path,
    config: PruneMethodConfig,
    *,
    calib: Calibration | torch.Tensor | None = None,
    evaluation: PerplexityEval | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Prune every decoder-block linear of ``model`` in place (magnitude, Wanda or SparseGPT,
    chosen by the config's type), on ``calib`` (a :class:`Calibration` spec, by default 128
    windows of the context from ``wiki:calib``, or an (n, seq_len) tensor of token ids).
    With ``evaluation``, also measure ``wiki:eval`` perplexity; with ``out``, write a run
    holding the pruned model (``model/``) and its masks (``masks.safetensors``).

    >>> lm = load_model("tiny:llama")
    >>> result = prune(lm, WandaConfig(sparsity=0.5), calib=Calibration(n=4, seq_len=32),
    ...                progress=False)
    >>> result["sparsity"]["total"]
    0.5
    """
    lm = resolve_model(model)
    calib = Calibration() if calib is None else calib
    require_finite_weights(lm.model, "prune")  # before calibration: packed or NaN weights
    if evaluation is not None:  # a bad evaluation window fails now, not after the pruning
        evaluation.window(lm, calib.shape[1] if isinstance(calib, torch.Tensor) else calib.seq_len)
    job = job_of("prune", lm, seed, method=config, calib=data_record(calib), eval=evaluation)

    def body(run: Run | None) -> dict[str, Any]:
        log.info("pruning %s with %s (%s)", lm.spec, config.TYPE, config.pattern)
        windows = windows_of(lm, calib, seed) if pruner.needs_calibration(config) else None
        batch = calib.batch_size if isinstance(calib, Calibration) else 8
        metrics = pruner.prune(lm, config, windows, batch_size=batch, progress=progress)
        log.info("sparsity %.4f in %.1f s", metrics["sparsity"]["total"], metrics["prune_seconds"])
        seq_len = windows.shape[1] if windows is not None else getattr(calib, "seq_len", None)
        if evaluation is not None and evaluation.enabled:
            metrics["perplexity"] = evaluation.measure(lm, seq_len, progress)
        metrics.update(peak_memory_gb())
        if run is not None:
            save_sparse_model(lm, run.dir)
        return metrics

    return execute_job(job, body, out, force)


def quantize(
    model: LoadedModel | str | Path,
    allocation: quant.AllocationConfig,
    *,
    sensitivity: quant.SensitivityConfig | None = None,
    quantizer: quant.QuantizerConfig | None = None,
    storage: quant.StorageConfig | None = None,
    calib: Calibration | torch.Tensor | None = None,
    evaluation: PerplexityEval | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Mixed-precision weight-only quantization (CPTQuant) of ``model`` in place: score each
    decoder layer (``sensitivity``: TDMPQ by default) on ``calib`` (32 x 512 tokens of
    ``wiki:calib`` by default), give bits under ``allocation`` (``AvgBitsConfig(4.5)``,
    ``MaxSizeConfig``, ``TiersConfig``, ``UniformConfig``), and pack every block linear
    (``quantizer``: RTN or GPTQ). With ``out``, write the reloadable packed model
    (``model/``), ``sensitivity.json``, ``bits.json``, ``sensitivity.png`` and the real size.

    >>> lm = load_model("tiny:llama")
    >>> result = quantize(lm, AvgBitsConfig(avg_bits=6.0, widths="8,4"),
    ...                   quantizer=RTNConfig(group_size=32),
    ...                   calib=Calibration(corpus="book", n=4, seq_len=32), progress=False)
    >>> result["avg_bits"] <= 6.0, sorted(set(result["bits_per_unit"].values()))
    (True, [4, 8])
    """
    lm = resolve_model(model)
    sensitivity = sensitivity or quant.TDMPQConfig()
    quantizer = quantizer or quant.RTNConfig()
    storage = storage or quant.StorageConfig()
    calib = QUANT_CALIB if calib is None else calib
    if sensitivity.scores_from is not None and isinstance(allocation, quant.UniformConfig):
        raise OptlabError("--scores-from reuses sensitivities: --uniform has none")
    job = job_of("quantize", lm, seed, sensitivity=sensitivity, allocation=allocation,
               quantizer=quantizer, storage=storage, calib=data_record(calib),
               eval=evaluation)  # fmt: skip

    # Before any work: NaN weights would be measured (perplexity_before) before the
    # quantizer refused them, and a bad evaluation window would fail only at the end.
    require_finite_weights(lm.model, "quantize")
    quant.check_gguf_format(allocation, quantizer, storage)
    seq_len = calib.shape[1] if isinstance(calib, torch.Tensor) else window_length(
        lm.model, calib.seq_len, default=QUANT_CALIB.seq_len)  # fmt: skip
    if evaluation is not None:
        evaluation.window(lm, seq_len)

    def body(run: Run | None) -> dict[str, Any]:
        parameters = sum(p.numel() for p in lm.model.parameters())
        metrics: dict[str, Any] = {"fp16_bytes": 2 * parameters}
        measure = evaluation is not None and evaluation.enabled
        if measure:
            metrics["perplexity_before"] = evaluation.measure(lm, seq_len, progress)
        windows = None
        if quant.needs_windows(allocation, sensitivity, quantizer):
            batch = calib.batch_size if isinstance(calib, Calibration) else 8
            windows = batched(windows_of(lm, calib, seed, QUANT_CALIB.seq_len), batch)
        settings = quant.score_settings(sensitivity, allocation, quantizer, calib, seed, lm.spec,
                                        storage)  # fmt: skip
        scores = None
        if sensitivity.scores_from is not None:
            units = quant.sensitivity_units(lm.model, sensitivity.granularity)
            scores = quant.reused_scores(sensitivity.scores_from, settings, list(units))
            log.info("reusing the %s sensitivities of %s", sensitivity.TYPE,
                     sensitivity.scores_from)  # fmt: skip
        result = quant.quantize(lm, allocation, sensitivity=sensitivity, quantizer=quantizer,
                                storage=storage, windows=windows, scores=scores, seed=seed,
                                progress=progress)  # fmt: skip
        if measure:
            metrics["perplexity_after"] = evaluation.measure(lm, seq_len, progress)
        metrics.update({key: result[key] for key in (
            "avg_bits", "effective_bits", "embeddings", "kernels", "sensitivity_seconds",
            "quantize_seconds")})  # fmt: skip
        metrics["bits_per_unit"] = result["unit_bits"]
        if "unit_types" in result:  # --format gguf: each unit's GGUF type
            metrics["types_per_unit"] = result["unit_types"]
            metrics["budget_bytes"] = result["budget_bytes"]
        if run is not None:
            method = None if isinstance(allocation, quant.UniformConfig) else sensitivity.TYPE
            sizes = quant.save_run(run.dir, lm, result, quantizer, storage, settings, method,
                                   sensitivity.granularity)  # fmt: skip
            metrics |= sizes | {
                "compression_vs_fp16": metrics["fp16_bytes"] / sizes["file_bytes"],
                "file_bits_per_parameter": 8 * sizes["file_bytes"] / parameters,
            }
            limit = getattr(allocation, "max_size_mb", None)
            limit = result.get("budget_bytes", None if limit is None else limit * 1e6)
            if limit is not None and sizes["file_bytes"] > limit:
                raise RuntimeError(f"{sizes['file_bytes']} bytes written, over the budget")
        log.info("quantized to %.3f average bits", metrics["avg_bits"])
        metrics.update(peak_memory_gb())
        return metrics

    return execute_job(job, body, out, force)


def retrain(
    model: LoadedModel | str | Path,
    config: PerpConfig | None = None,
    *,
    dense: LoadedModel | str | Path | None = None,
    evaluation: PerplexityEval | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Retrain a pruned model (a prune run directory, or a loaded pruned model) in place: PERP
        (biases, norms and masked LoRA adapters, merged back), full retraining with the masks
        re-applied, or block-wise reconstruction of ``dense`` (by default the run's own dense
        model). The sparsity mask holds exactly (``mask_held``). A run directory (and the dense
    model named in it) is loaded on ``device`` in ``dtype``.

        >>> lm = load_model("tiny:llama")
        >>> _ = prune(lm, MagnitudeConfig(), progress=False)
        >>> result = retrain(lm, PerpConfig(steps=2, seq_len=32, corpus="book"), progress=False)
        >>> result["mask_held"], len(result["losses"])
        (True, 2)
    """
    config = replace(config or PerpConfig(), seed=seed)  # the call's seed is the config's
    source: Path | None = None
    if not isinstance(model, LoadedModel):
        source, source_config = source_run(model)
        lm = load_model(str(source), dtype=dtype, device=device, seed=seed)
        if config.method == "reconstruct" and dense is None:
            dense = source_config.get("model")
            if not dense:
                raise OptlabError(f"{source}/config.yaml does not name the dense model to match")
            dense = load_model(str(dense), dtype=dtype, device=device,
                               seed=source_config.get("seed", 0))  # fmt: skip
    else:
        lm = model
    # The job records the window really used: PERP's default 512 capped at a short context.
    config = replace(config, seq_len=window_length(lm.model, config.seq_len,
                                                   default=PerpConfig.seq_len))  # fmt: skip
    if config.method == "reconstruct" and dense is None:
        raise OptlabError("reconstruct needs the dense model: pass dense=")
    if evaluation is not None:  # a bad evaluation window fails now, not after the training
        evaluation.window(lm, config.seq_len)
    dense_lm = None if dense is None else resolve_model(dense, dtype=dtype, device=device)
    # The source run's perplexity is read now: a damaged metrics.json fails before training.
    source_metrics = None if source is None else source / "metrics.json"
    source_perplexity = None
    if source_metrics is not None and source_metrics.exists():
        source_perplexity = read_json_object(source_metrics, "source run metrics").get(
            "perplexity")  # fmt: skip
    job = job_of("retrain", lm, seed, {"run": str(source or lm.spec)}, method=config,
               eval=evaluation)  # fmt: skip

    def body(run: Run | None) -> dict[str, Any]:
        metrics = perp.retrain(lm, config, dense=dense_lm, progress=progress)
        share, held = 100 * metrics["trainable_share"], metrics["mask_held"]
        log.info("retrained %.3f%% of the parameters; mask held: %s", share, held)
        if evaluation is not None and evaluation.enabled:
            metrics["perplexity"] = evaluation.measure(lm, config.seq_len, progress)
        if source_perplexity is not None:
            metrics["source_perplexity"] = source_perplexity
        metrics.update(peak_memory_gb())
        if run is not None:
            save_sparse_model(lm, run.dir)
        return metrics

    return execute_job(job, body, out, force)


def export(
    model: LoadedModel | str | Path,
    config: ExportConfig | None = None,
    *,
    out: str | Path,
    force: bool = False,
    progress: bool = True,
) -> Result:
    """Write ``model`` (a spec, a dense or pruned model, or a quantize run) as one GGUF file
    for llama.cpp, Ollama, LM Studio and transformers (``gguf_file=``): llama.cpp's tensor
    names and hyperparameters, the tokenizer and chat template. Float block linears take
    ``config.weight_type`` (F16 by default); a quantize run's packed layers keep their width
    (<= 4 bits: Q4_1 blocks with the same codes; 8 bits: Q8_0); embeddings and the head
    ``config.embed_type`` (Q8_0). Families: llama, qwen2, gemma3, gpt2, gpt_neox (OPT is
    refused: llama.cpp has no OPT architecture). ``--force`` replaces only a GGUF file.

    >>> result = export(load_model("tiny:llama"), ExportConfig(weight_type="q4_1"),
    ...                 out="tiny.gguf", progress=False)
    >>> result["architecture"], result["tensor_types"]
    ('llama', {'q8_0': 2, 'q4_1': 14, 'f32': 5})
    >>> result["file_bytes"] < 2 * result["parameters"]   # smaller than fp16
    True
    >>> load_model("tiny.gguf").family                   # read back by transformers
    'llama'
    """
    config = config or ExportConfig()
    if not isinstance(model, LoadedModel) and (Path(model) / GGUF_RUN_FILE).is_file():
        raise OptlabError(f"{str(model)!r} is a `quantize --format gguf` run: its file is "
                          f"{Path(model) / GGUF_RUN_FILE}, written already")  # fmt: skip
    lm = resolve_model(model)
    summary = export_gguf(lm, config, out, force=force, progress=progress)
    log.info("wrote %s: %.3f MB, %.3f bits per parameter", summary["file"],
             summary["file_mb"], summary["bits_per_parameter"])  # fmt: skip
    return Result(summary)
