"""Retraining benchmark: one-shot pruned vs PERP vs full retraining, at the same step budget.

Each step runs in its own process through the CLI (`optlab prune/retrain ... --json`).

    python benchmarks/retrain.py --steps 200          # the paper's budget: hours on 2 CPU cores
    python benchmarks/retrain.py --steps 20 --methods wanda --patterns unstructured
    python benchmarks/retrain.py --device cuda        # minutes on one GPU
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from prune import optlab, row


def gpu_gb(metrics: dict) -> str:
    return f"{metrics['peak_cuda_gb']:.2f}" if "peak_cuda_gb" in metrics else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument(
        "--retrain",
        default="perp,full",
        help="retraining methods to compare; method@lr sets its learning rate",
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=40)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (pruning and retraining)")
    args = parser.parse_args()
    common = ["--seq-len", str(args.seq_len), "--eval-limit", str(args.eval_limit),
              "--device", args.device]  # fmt: skip
    print(
        f"model {args.model} on {args.device}; {args.steps} steps of 2 x {args.seq_len} tokens "
        f"of wiki:calib; perplexity on the first {args.eval_limit} windows of wiki:eval\n"
    )
    row("pruning", "pattern", "retraining", "perplexity", "train s", "trainable share",
        "peak RSS GB", "peak GPU GB", "mask held")  # fmt: skip
    row(*["---"] * 9)
    with tempfile.TemporaryDirectory(prefix="optlab-bench-") as work:
        for pattern in args.patterns.split(","):
            for method in args.methods.split(","):
                pruned = Path(work) / f"{method}-{pattern.replace(':', '')}"
                r = optlab(
                    "prune", args.model, "--method", method, "--pattern", pattern,
                    "--n-calib", str(args.n_calib), "--out", str(pruned), *common,
                )  # fmt: skip
                row(method, pattern, "one-shot", f"{r['perplexity']['perplexity']:.2f}", "-",
                    "-", f"{r['peak_rss_gb']:.2f}", gpu_gb(r), "-")  # fmt: skip
                for retrain in args.retrain.split(","):
                    name, _, lr = retrain.partition("@")  # full@5e-5: another learning rate
                    t = optlab(
                        "retrain", str(pruned), "--method", name, "--steps", str(args.steps),
                        *(["--lr", lr] if lr else []), "--out", f"{pruned}-{retrain}", *common,
                    )  # fmt: skip
                    row(method, pattern, retrain, f"{t['perplexity']['perplexity']:.2f}",
                        f"{t['seconds']:.0f}", f"{100 * t['trainable_share']:.3f}%",
                        f"{t['peak_rss_gb']:.2f}", gpu_gb(t), t["mask_held"])  # fmt: skip


if __name__ == "__main__":
    main()
