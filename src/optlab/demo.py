"""The quickstart: the default model, evaluated, written up as a run with a Markdown report.

It grows as methods land (pruning, quantization, ...): each adds a step and a report section.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from optlab.api import describe_model, load_model
from optlab.core.data import load_text
from optlab.core.run import Run, seed_everything
from optlab.eval.perplexity import perplexity
from optlab.eval.scorer import Scorer
from optlab.eval.tasks import get_task

log = logging.getLogger("optlab")

PROMPTS = ("The capital of France is", "The chemical symbol for gold is")
SEQ_LEN = 512  # the window of the official pruning code's measurements on this model


def run_demo(
    out: str | Path,
    *,
    force: bool = False,
    limit: int = 40,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Evaluate the default model and write ``out`` with metrics and ``report.md``."""
    config = {"recipe": "quickstart", "model": "default", "seq_len": SEQ_LEN, "limit": limit}
    with Run(out, config=config, seed=seed, device=device, dtype=dtype, force=force) as run:
        seed_everything(seed)
        start = time.perf_counter()
        lm = load_model("default", dtype=dtype, device=device)
        info = describe_model(lm)
        log.info("loaded %s: %s, %d blocks", lm.spec, info["family"], info["blocks"])
        scorer = Scorer(lm)
        log.info("perplexity on wiki:eval (%d windows of %d tokens)", limit, SEQ_LEN)
        ppl = perplexity(scorer, load_text("wiki:eval"), seq_len=SEQ_LEN, limit=limit)
        log.info("multiple choice: mc:sentiment")
        sentiment = get_task("mc:sentiment")(scorer, limit=200)
        completions = scorer.generate(list(PROMPTS), max_new_tokens=12, until=["\n"])
        metrics = {
            "model": {k: info[k] for k in ("family", "blocks", "parameters")},
            "ppl:wiki": ppl.to_dict(),
            "mc:sentiment": sentiment,
            "samples": dict(zip(PROMPTS, completions, strict=True)),
            "seconds": round(time.perf_counter() - start, 1),
        }
        run.add_metrics(metrics)
        run.save_text("report.md", _report(metrics))
    log.info("run written to %s (report: %s)", run.path, run.path / "report.md")
    return {**metrics, "run": str(run.path)}


def _report(m: dict[str, Any]) -> str:
    ppl, mc = m["ppl:wiki"], m["mc:sentiment"]
    samples = "\n".join(f"- *{p}* → {c!r}" for p, c in m["samples"].items())
    return f"""# optlab quickstart

Model: `default` (SmolLM2-135M-Instruct, {m["model"]["family"]}, {m["model"]["blocks"]} blocks,
{m["model"]["parameters"] / 1e6:.1f}M parameters, fp32).

| measurement | value |
|---|---|
| perplexity, `wiki:eval` ({ppl["windows"]} x {ppl["seq_len"]} tokens) | {ppl["perplexity"]:.2f} |
| sentiment accuracy, `mc:sentiment` ({mc["n"]} sentences) | {mc["acc"]:.3f} |

Greedy completions:
{samples}

Total time: {m["seconds"]} s. Reproduce one number: `optlab eval default --tasks ppl:wiki
--seq-len {ppl["seq_len"]} --limit {ppl["windows"]}`.
"""
