"""Where the quickstart's time goes: every step of `optlab demo`, timed on its own.

The steps are the quickstart's (recipes/quickstart.yaml) with its sizes, called in one process
(the recipe also saves and reloads each model between its steps; that is not timed here):
load the default model; evaluate it (perplexity on ``--limit`` x 512 ``wiki:eval`` windows,
100 ``mc:sentiment`` sentences, two 12-token completions); prune 50% with Wanda on 16 x 512
calibration windows; evaluate; load a fresh copy, score it with TDMPQ on 8 x 512 windows and
quantize it to 4.5 bits on average (groups of 64); evaluate the packed model.
Set-up (the cleaned Wikipedia text and its token cache, which a fresh clone builds once) is
timed first and kept apart.

Prints one line per step and a Markdown table; ``--profile`` adds a cProfile top list per step
(``--top`` functions by own time); ``--json FILE`` writes the seconds. Run it twice, once per
source tree, back to back, to compare code:

    PYTHONPATH=src .venv/bin/python benchmarks/demo_profile.py --profile
    PYTHONPATH=src .venv/bin/python benchmarks/demo_profile.py --limit 2 --steps tdmpq,quantized
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from optlab.api import load_model
from optlab.core.data import load_text, sample_windows, token_windows
from optlab.core.layerwise import batched
from optlab.core.models import LoadedModel
from optlab.eval.perplexity import perplexity
from optlab.eval.scorer import Scorer
from optlab.eval.tasks import get_task
from optlab.pruning.pruner import WandaConfig, prune
from optlab.quant.quantize import AvgBitsConfig, RTNConfig, TDMPQConfig, quantize

SEQ_LEN = 512  # the demo's window
PROMPTS = ("The capital of France is", "The chemical symbol for gold is")
STEPS = ("dense", "wanda", "pruned", "tdmpq", "quantized")


class Timer:
    """Times named parts, each optionally under cProfile, and remembers the results."""

    def __init__(self, profile: bool, top: int) -> None:
        self.profile, self.top = profile, top
        self.seconds: dict[str, float] = {}
        self.profiles: dict[str, str] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        profiler = cProfile.Profile() if self.profile else None
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            result = fn()
        finally:
            if profiler is not None:
                profiler.disable()
        self.seconds[name] = time.perf_counter() - start
        print(f"{name:<28} {self.seconds[name]:8.1f} s", file=sys.stderr, flush=True)
        if profiler is not None:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(self.top)
            self.profiles[name] = _trim(out.getvalue())
        return result


def _trim(report: str) -> str:
    """The pstats table without its preamble, file paths cut to the package's own path."""
    lines = report.splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(
        re.sub(r"/\S*/(site-packages|src)/", "", line) for line in lines[start:] if line.strip()
    )


def evaluate(
    timer: Timer, lm: LoadedModel, stage: str, limit: int, sentences: int
) -> dict[str, Any]:
    """The demo's evaluation, each part timed: perplexity, sentiment, two completions."""
    scorer = Scorer(lm)
    text = load_text("wiki:eval")
    ppl = timer(f"{stage}: ppl {limit}x{SEQ_LEN}", lambda: perplexity(scorer, text,
                                                                       seq_len=SEQ_LEN,
                                                                       limit=limit))  # fmt: skip
    task = get_task("mc:sentiment")
    sentiment = timer(f"{stage}: sentiment {sentences}", lambda: task(scorer, limit=sentences))
    samples = timer(f"{stage}: generate 2x12", lambda: scorer.generate(
        list(PROMPTS), max_new_tokens=12, until=["\n"]))  # fmt: skip
    return {"ppl": ppl.perplexity, "nll": ppl.nll, **sentiment, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=20, help="wiki:eval windows (demo: 20)")
    parser.add_argument("--sentences", type=int, default=100, help="mc:sentiment sentences")
    parser.add_argument("--prune-calib", type=int, default=16, help="Wanda windows (demo: 16)")
    parser.add_argument("--quant-calib", type=int, default=8, help="TDMPQ windows (demo: 8)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"subset of {','.join(STEPS)}")
    parser.add_argument("--profile", action="store_true", help="cProfile top list per step")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--json", help="write the seconds per step to this file")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps.split(",")
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {STEPS}")

    import optlab

    print(f"optlab from {os.path.dirname(optlab.__file__)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()}",
          file=sys.stderr)  # fmt: skip
    timer = Timer(args.profile, args.top)
    total = time.perf_counter()

    def setup() -> None:  # what a fresh clone builds once: the cleaned text, its token cache
        lm = load_model("default")
        token_windows(lm.tokenizer, load_text("wiki:eval"), SEQ_LEN)
        token_windows(lm.tokenizer, load_text("wiki:calib"), SEQ_LEN)

    timer("set-up (text, token cache)", setup)
    start = time.perf_counter()
    lm = timer("load", lambda: load_model("default"))
    results: dict[str, Any] = {}  # what each step computed: compare runs for equal results
    if "dense" in steps:
        results["dense"] = evaluate(timer, lm, "dense", args.limit, args.sentences)
    if "wanda" in steps:

        def wanda() -> dict[str, Any]:  # sampling the windows included, as the command does
            calib = sample_windows(lm.tokenizer, load_text("wiki:calib"), args.prune_calib,
                                   SEQ_LEN, 0)  # fmt: skip
            return prune(lm, WandaConfig(sparsity=0.5), calib)

        pruned = timer(f"wanda prune {args.prune_calib}x{SEQ_LEN}", wanda)
        results["wanda"] = {"sparsity": pruned["sparsity"]["total"]}
    if "pruned" in steps:
        results["pruned"] = evaluate(timer, lm, "pruned", args.limit, args.sentences)
    if "tdmpq" in steps or "quantized" in steps:
        lm = timer("load (fresh copy)", lambda: load_model("default"))

        def tdmpq() -> dict[str, Any]:
            windows = batched(sample_windows(lm.tokenizer, load_text("wiki:calib"),
                                             args.quant_calib, SEQ_LEN, 0), 8)  # fmt: skip
            return quantize(lm, AvgBitsConfig(avg_bits=4.5), sensitivity=TDMPQConfig(),
                            quantizer=RTNConfig(group_size=64), windows=windows)  # fmt: skip

        result = timer(f"tdmpq quantize {args.quant_calib}x{SEQ_LEN}", tdmpq)
        # quantize() splits its own time: scoring + allocation, then packing the layers.
        timer.seconds["  of which scoring"] = result["sensitivity_seconds"]
        timer.seconds["  of which packing"] = result["quantize_seconds"]
        results["tdmpq"] = {"scores": result["sensitivity"], "bits": result["unit_bits"]}
    if "quantized" in steps:
        results["quantized"] = evaluate(timer, lm, "quantized", args.limit, args.sentences)
    steps_seconds = time.perf_counter() - start
    print(f"load average after {os.getloadavg()}", file=sys.stderr)

    print("| step | seconds |\n| --- | --- |")
    for name, seconds in timer.seconds.items():
        print(f"| {name} | {seconds:.1f} |")
    print(f"| **after set-up, total** | **{steps_seconds:.1f}** |")
    for name, report in timer.profiles.items():
        print(f"\n### {name}\n\n```text\n{report}\n```")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"seconds": timer.seconds, "after_setup": steps_seconds,
                       "total": time.perf_counter() - total, "threads": torch.get_num_threads(),
                       "load": os.getloadavg(), "results": results}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
