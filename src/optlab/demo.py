"""The quickstart: the default model evaluated, pruned with Wanda and, separately, quantized to
4.5 bits on average with TDMPQ sensitivities, each evaluated the same way, and written up as a
run with a Markdown report. It grows as methods land: each adds a step."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from optlab.api import describe_model, load_model
from optlab.core.calibration import Calibration
from optlab.core.config import config_to_dict
from optlab.core.data import load_text
from optlab.core.models import LoadedModel
from optlab.core.run import Run, seed_everything
from optlab.eval.perplexity import perplexity
from optlab.eval.scorer import Scorer
from optlab.eval.tasks import get_task
from optlab.prune.pruner import WandaConfig, prune
from optlab.quant.quantize import QuantConfig, quantize

log = logging.getLogger("optlab")

PROMPTS = ("The capital of France is", "The chemical symbol for gold is")
SEQ_LEN = 512  # the window of the official pruning code's measurements on this model


def run_demo(
    out: str | Path,
    *,
    force: bool = False,
    limit: int = 20,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Evaluate the default model, prune it with Wanda and quantize a fresh copy with TDMPQ,
    evaluating each the same way; write ``out``."""
    prune_config = WandaConfig(sparsity=0.5)
    calib = Calibration(n=16, seq_len=SEQ_LEN)
    # Groups of 64 divide SmolLM2's 576 and 1536 inputs, so every layer gets the int4 kernel.
    quant_config = QuantConfig(sensitivity="tdmpq", avg_bits=4.5, group_size=64, n_calib=8,
                               seq_len=SEQ_LEN)  # fmt: skip
    config = {"recipe": "quickstart", "model": "default", "seq_len": SEQ_LEN, "limit": limit,
              "prune": config_to_dict(prune_config), "prune_calib": config_to_dict(calib),
              "quantize": config_to_dict(quant_config)}  # fmt: skip
    with Run(out, config=config, seed=seed, device=device, dtype=dtype, force=force) as run:
        seed_everything(seed)
        start = time.perf_counter()
        lm = load_model("default", dtype=dtype, device=device)
        info = describe_model(lm)
        log.info("loaded %s: %s, %d blocks", lm.spec, info["family"], info["blocks"])
        metrics: dict[str, Any] = {
            "model": {k: info[k] for k in ("family", "blocks", "parameters")}
        }
        log.info("step 1/5: evaluate the dense model")
        metrics["dense"] = _evaluate(lm, limit)
        log.info("step 2/5: prune 50%% of every block linear with Wanda (16 x %d tokens)", SEQ_LEN)
        pruned = prune(lm, prune_config, calib.windows(lm.tokenizer, SEQ_LEN, seed))
        metrics["prune"] = {"sparsity": pruned["sparsity"]["total"],
                            "seconds": round(pruned["prune_seconds"], 1)}  # fmt: skip
        log.info("step 3/5: evaluate the pruned model")
        metrics["wanda50"] = _evaluate(lm, limit)
        log.info("step 4/5: quantize a fresh copy to 4.5 bits on average, by TDMPQ sensitivity")
        lm = load_model("default", dtype=dtype, device=device)
        quantized = quantize(lm, quant_config)
        metrics["quantize"] = {
            "avg_bits": round(quantized["avg_bits"], 3),
            "effective_bits": round(quantized["effective_bits"], 3),
            "layers_per_width": {
                str(w): sum(b == w for b in quantized["unit_bits"].values())
                for w in sorted(set(quantized["unit_bits"].values()), reverse=True)
            },
            "seconds": round(quantized["sensitivity_seconds"] + quantized["quantize_seconds"], 1),
        }
        run.save_json("bits.json", quantized["unit_bits"])
        log.info("step 5/5: evaluate the quantized model")
        metrics["tdmpq45"] = _evaluate(lm, limit)
        metrics["seconds"] = round(time.perf_counter() - start, 1)
        run.add_metrics(metrics)
        run.save_text("report.md", _report(metrics))
    log.info("run written to %s (report: %s)", run.path, run.path / "report.md")
    return {**metrics, "run": str(run.path)}


def _evaluate(lm: LoadedModel, limit: int) -> dict[str, Any]:
    scorer = Scorer(lm)
    ppl = perplexity(scorer, load_text("wiki:eval"), seq_len=SEQ_LEN, limit=limit)
    sentiment = get_task("mc:sentiment")(scorer, limit=100)
    completions = scorer.generate(list(PROMPTS), max_new_tokens=12, until=["\n"])
    return {
        "ppl:wiki": ppl.to_dict(),
        "mc:sentiment": sentiment,
        "samples": dict(zip(PROMPTS, completions, strict=True)),
    }


def _report(m: dict[str, Any]) -> str:
    dense, pruned, quantized, q = m["dense"], m["wanda50"], m["tdmpq45"], m["quantize"]
    ppl = dense["ppl:wiki"]
    samples = "\n".join(
        f"| *{p}* | {dense['samples'][p]!r} | {pruned['samples'][p]!r} | "
        f"{quantized['samples'][p]!r} |"
        for p in PROMPTS
    )
    bit_counts = ", ".join(f"{n} at {w}" for w, n in q["layers_per_width"].items())
    return f"""# optlab quickstart

Model: `default` (SmolLM2-135M-Instruct, {m["model"]["family"]}, {m["model"]["blocks"]} blocks,
{m["model"]["parameters"] / 1e6:.1f}M parameters, fp32), then the same model with 50% of the
weights of every block linear pruned by Wanda (sparsity {m["prune"]["sparsity"]:.4f}, pruned
in {m["prune"]["seconds"]} s from 16 calibration windows of {SEQ_LEN} tokens), and a fresh
copy quantized by TDMPQ sensitivity to {q["avg_bits"]} bits per block-linear weight on average
({q["effective_bits"]} with scales and zero points; layers: {bit_counts} bits, per layer in
`bits.json`; packed weights, groups of 64; {q["seconds"]} s from 8 calibration windows).

| measurement | dense | Wanda 50% | TDMPQ 4.5 bits |
|---|---|---|---|
| perplexity, `wiki:eval` ({ppl["windows"]} x {ppl["seq_len"]} tokens) | \
{ppl["perplexity"]:.2f} | {pruned["ppl:wiki"]["perplexity"]:.2f} | \
{quantized["ppl:wiki"]["perplexity"]:.2f} |
| sentiment accuracy, `mc:sentiment` ({dense["mc:sentiment"]["n"]} sentences) | \
{dense["mc:sentiment"]["acc"]:.3f} | {pruned["mc:sentiment"]["acc"]:.3f} | \
{quantized["mc:sentiment"]["acc"]:.3f} |

| prompt | dense | Wanda 50% | TDMPQ 4.5 bits |
|---|---|---|---|
{samples}

Total time: {m["seconds"]} s. Reproduce: `optlab eval default --tasks ppl:wiki --seq-len
{ppl["seq_len"]} --limit {ppl["windows"]}`; `optlab prune default --method wanda --n-calib 16
--seq-len {SEQ_LEN} --eval-limit {ppl["windows"]} --out runs/wanda50`; `optlab quantize default
--sensitivity tdmpq --avg-bits 4.5 --group-size 64 --n-calib 8 --eval-limit {ppl["windows"]}
--out runs/tdmpq45`.
"""
