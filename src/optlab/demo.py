"""The quickstart: the default model evaluated, pruned with Wanda, evaluated again, and
written up as a run with a Markdown report. It grows as methods land: each adds a step."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from optlab.api import describe_model, load_model
from optlab.core.config import config_to_dict
from optlab.core.data import load_text
from optlab.core.models import LoadedModel
from optlab.core.run import Run, seed_everything
from optlab.eval.perplexity import perplexity
from optlab.eval.scorer import Scorer
from optlab.eval.tasks import get_task
from optlab.prune.pruner import PruneConfig, prune

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
    """Evaluate the default model, prune it with Wanda, evaluate again; write ``out``."""
    prune_config = PruneConfig(method="wanda", sparsity=0.5, n_calib=16, seq_len=SEQ_LEN)
    config = {"recipe": "quickstart", "model": "default", "seq_len": SEQ_LEN, "limit": limit,
              "prune": config_to_dict(prune_config)}  # fmt: skip
    with Run(out, config=config, seed=seed, device=device, dtype=dtype, force=force) as run:
        seed_everything(seed)
        start = time.perf_counter()
        lm = load_model("default", dtype=dtype, device=device)
        info = describe_model(lm)
        log.info("loaded %s: %s, %d blocks", lm.spec, info["family"], info["blocks"])
        metrics: dict[str, Any] = {
            "model": {k: info[k] for k in ("family", "blocks", "parameters")}
        }
        log.info("step 1/3: evaluate the dense model")
        metrics["dense"] = _evaluate(lm, limit)
        log.info("step 2/3: prune 50%% of every block linear with Wanda (16 x %d tokens)", SEQ_LEN)
        pruned = prune(lm, prune_config)
        metrics["prune"] = {"sparsity": pruned["sparsity"]["total"],
                            "seconds": round(pruned["prune_seconds"], 1)}  # fmt: skip
        log.info("step 3/3: evaluate the pruned model")
        metrics["wanda50"] = _evaluate(lm, limit)
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
    dense, pruned = m["dense"], m["wanda50"]
    ppl = dense["ppl:wiki"]
    samples = "\n".join(
        f"| *{p}* | {dense['samples'][p]!r} | {pruned['samples'][p]!r} |" for p in PROMPTS
    )
    return f"""# optlab quickstart

Model: `default` (SmolLM2-135M-Instruct, {m["model"]["family"]}, {m["model"]["blocks"]} blocks,
{m["model"]["parameters"] / 1e6:.1f}M parameters, fp32), then the same model with 50% of the
weights of every block linear pruned by Wanda (sparsity {m["prune"]["sparsity"]:.4f}, pruned
in {m["prune"]["seconds"]} s from 16 calibration windows of {SEQ_LEN} tokens).

| measurement | dense | Wanda 50% |
|---|---|---|
| perplexity, `wiki:eval` ({ppl["windows"]} x {ppl["seq_len"]} tokens) | \
{ppl["perplexity"]:.2f} | {pruned["ppl:wiki"]["perplexity"]:.2f} |
| sentiment accuracy, `mc:sentiment` ({dense["mc:sentiment"]["n"]} sentences) | \
{dense["mc:sentiment"]["acc"]:.3f} | {pruned["mc:sentiment"]["acc"]:.3f} |

| prompt | dense | Wanda 50% |
|---|---|---|
{samples}

Total time: {m["seconds"]} s. Reproduce: `optlab eval default --tasks ppl:wiki --seq-len
{ppl["seq_len"]} --limit {ppl["windows"]}`; `optlab prune default --method wanda --n-calib 16
--seq-len {SEQ_LEN} --eval-limit {ppl["windows"]} --out runs/wanda50`.
"""
