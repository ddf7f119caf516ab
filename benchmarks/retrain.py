"""Retraining benchmark: one-shot pruned vs PERP vs full retraining, at the same step budget.

Each step runs in its own process through the CLI (`optlab prune/retrain ... --json`).

    python benchmarks/retrain.py --steps 200          # the paper's budget: hours on 2 CPU cores
    python benchmarks/retrain.py --steps 20 --methods wanda --patterns unstructured
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from prune import optlab, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--retrain", default="perp,full", help="retraining methods to compare")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=40)
    args = parser.parse_args()
    common = ["--seq-len", str(args.seq_len), "--eval-limit", str(args.eval_limit)]
    print(f"model {args.model}; {args.steps} steps of 2 x {args.seq_len} tokens of wiki:calib; "
          f"perplexity on the first {args.eval_limit} windows of wiki:eval\n")  # fmt: skip
    row("pruning", "pattern", "retraining", "perplexity", "train s", "trainable share",
        "peak RSS GB", "mask held")  # fmt: skip
    row(*["---"] * 8)
    with tempfile.TemporaryDirectory(prefix="optlab-bench-") as work:
        for pattern in args.patterns.split(","):
            for method in args.methods.split(","):
                pruned = Path(work) / f"{method}-{pattern.replace(':', '')}"
                r = optlab(
                    "prune", args.model, "--method", method, "--pattern", pattern,
                    "--n-calib", str(args.n_calib), "--out", str(pruned), *common,
                )  # fmt: skip
                row(method, pattern, "one-shot", f"{r['perplexity']['perplexity']:.2f}", "-",
                    "-", f"{r['peak_rss_gb']:.2f}", "-")  # fmt: skip
                for retrain in args.retrain.split(","):
                    t = optlab(
                        "retrain", str(pruned), "--method", retrain, "--steps", str(args.steps),
                        "--out", f"{pruned}-{retrain}", *common,
                    )  # fmt: skip
                    row(method, pattern, retrain, f"{t['perplexity']['perplexity']:.2f}",
                        f"{t['seconds']:.0f}", f"{100 * t['trainable_share']:.3f}%",
                        f"{t['peak_rss_gb']:.2f}", t["mask_held"])  # fmt: skip


if __name__ == "__main__":
    main()
