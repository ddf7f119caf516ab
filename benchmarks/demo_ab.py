"""The quickstart's slow steps with an older optlab's code and this one's, alternated in one
process, so both sides share the machine's load (the 2 cores are shared; absolute times drift).

``--old-src`` is the ``src`` folder of the older tree (``git archive COMMIT src | tar -x``).
Its versions of the modules this branch sped up (quantizer, sensitivity, scorer, and
dequantization in QuantLinear) are loaded beside the current ones; everything else is shared.
Each step prints old and new seconds and checks that both compute the same result.

    mkdir -p /tmp/base && git archive a92a5a9 src | tar -x -C /tmp/base
    PYTHONPATH=src .venv/bin/python benchmarks/demo_ab.py --old-src /tmp/base/src
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from optlab.api import load_model
from optlab.core.data import load_text, sample_windows
from optlab.core.layerwise import batched
from optlab.eval import scorer as new_scorer
from optlab.eval.perplexity import perplexity
from optlab.eval.tasks import get_task
from optlab.quant import apply, linear
from optlab.quant import quantizer as new_quantizer
from optlab.quant import sensitivity as new_sensitivity
from optlab.quant.allocate import allocate_budget

SEQ_LEN = 512


def _load(path: Path, name: str, **patch: Any) -> ModuleType:
    """A module from the old tree under its own name; ``patch`` replaces its globals."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    for key, value in patch.items():
        setattr(module, key, value)
    return module


@contextlib.contextmanager
def old_dequantization(old_quantizer: ModuleType) -> Iterator[None]:
    """QuantLinear and the RTN model pass as they were: the old quantize_rtn and dequantize,
    and no kept weights (the old scorer never opens KeepDequantized)."""
    saved = linear.dequantize, apply.quantize_rtn
    linear.dequantize, apply.quantize_rtn = old_quantizer.dequantize, old_quantizer.quantize_rtn
    try:
        yield
    finally:
        linear.dequantize, apply.quantize_rtn = saved


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def alternate(name: str, old: Callable[[], Any], new: Callable[[], Any], rounds: int,
              same: Callable[[Any, Any], bool]) -> None:  # fmt: skip
    """old, new, old, new, ...: the best of each side, the ratio and whether results agree."""
    times: dict[str, list[float]] = {"old": [], "new": []}
    results: dict[str, Any] = {}
    for _ in range(rounds):
        for side, fn in (("old", old), ("new", new)):
            seconds, results[side] = timed(fn)
            times[side].append(seconds)
    best_old, best_new = min(times["old"]), min(times["new"])
    print(f"| {name} | {best_old:.1f} | {best_new:.1f} | {best_old / best_new:.1f}x | "
          f"{same(results['old'], results['new'])} | {os.getloadavg()[0]:.1f} |",
          flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-src", required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tdmpq-windows", type=int, default=2)
    parser.add_argument("--limit", type=int, default=20, help="wiki:eval windows")
    args = parser.parse_args()
    base = args.old_src / "optlab"
    old_quantizer = _load(base / "quant" / "quantizer.py", "old_quantizer")
    old_sensitivity = _load(base / "quant" / "sensitivity.py", "old_sensitivity",
                            quantize_rtn=old_quantizer.quantize_rtn)  # fmt: skip
    old_scorer = _load(base / "eval" / "scorer.py", "old_scorer")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average before "
          f"{os.getloadavg()}")  # fmt: skip
    print("\n| step | old s | new s | old / new | same result | load |\n| --- | --- | --- "
          "| --- | --- | --- |")  # fmt: skip
    lm = load_model("default")
    model = lm.model
    units = new_sensitivity.sensitivity_units(model)
    names = [n for members in units.values() for n in members]
    weights = {n: model.get_submodule(n).weight.detach() for n in names}

    alternate("RTN rounding errors, 210 linears (4 bits, groups of 64)",
              lambda: {n: old_quantizer.quantize_rtn(w, 4, 64).dequantize() for n, w in
                       weights.items()},
              lambda: {n: new_quantizer.quantize_rtn(w, 4, 64).dequantize() for n, w in
                       weights.items()}, args.rounds,
              lambda a, b: all(torch.equal(a[n], b[n]) for n in a))  # fmt: skip

    windows = batched(sample_windows(lm.tokenizer, load_text("wiki:calib"), args.tdmpq_windows,
                                     SEQ_LEN, 0), 8)  # fmt: skip
    alternate(f"TDMPQ scores, {args.tdmpq_windows} x {SEQ_LEN}",
              lambda: old_sensitivity.tdmpq_scores(model, windows, units, 4, 64),
              lambda: new_sensitivity.tdmpq_scores(model, windows, units, 4, 64), args.rounds,
              lambda a, b: all(abs(a[u] - b[u]) <= 1e-5 * abs(a[u]) for u in a))  # fmt: skip

    # The demo's allocation from TDMPQ scores on these windows, then packing a fresh copy each
    # time (the step mutates the model).
    scores = new_sensitivity.tdmpq_scores(model, windows, units, 4, 64)
    counts = {u: sum(weights[n].numel() for n in members) for u, members in units.items()}
    bits = allocate_budget(scores, counts, (16, 8, 4), 4.5 * sum(counts.values()))
    linear_bits = {n: bits[u] for u, members in units.items() for n in members}

    def pack(old: bool) -> torch.nn.Module:
        fresh = copy.deepcopy(model)
        with old_dequantization(old_quantizer) if old else contextlib.nullcontext():
            apply.quantize_rtn_model(fresh, linear_bits, 64)
        return fresh

    alternate("packing 210 linears (RTN, QuantLinear)", lambda: pack(True), lambda: pack(False),
              args.rounds, lambda a, b: all(torch.equal(x, y) for x, y in zip(
                  a.state_dict().values(), b.state_dict().values(), strict=True)))  # fmt: skip
    quantized = copy.deepcopy(lm)
    quantized.model = pack(False)
    text = load_text("wiki:eval")
    task = get_task("mc:sentiment")
    for label, which in (("dense", lm), ("quantized", quantized)):

        def ppl(module: ModuleType, which: Any = which) -> float:
            return perplexity(module.Scorer(which, progress=False), text, seq_len=SEQ_LEN,
                              limit=args.limit).perplexity  # fmt: skip

        def sentiment(module: ModuleType, which: Any = which) -> dict:
            return task(module.Scorer(which, progress=False), limit=100)

        def old(fn: Callable[[ModuleType], Any]) -> Callable[[], Any]:
            def run() -> Any:
                with old_dequantization(old_quantizer):
                    return fn(old_scorer)

            return run

        alternate(f"{label}: perplexity {args.limit} x {SEQ_LEN}", old(ppl),
                  lambda ppl=ppl: ppl(new_scorer), args.rounds,
                  lambda a, b: abs(a - b) <= 1e-5 * a)  # fmt: skip
        alternate(f"{label}: sentiment, 100 sentences", old(sentiment),
                  lambda sentiment=sentiment: sentiment(new_scorer), args.rounds,
                  lambda a, b: a == b)  # fmt: skip
    print(f"\nload average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
