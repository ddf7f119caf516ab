"""Pruning benchmark: perplexity, time and peak memory of each method on one model.

Every configuration runs in its own process through the CLI (`optlab prune ... --json`), so
peak RSS is per configuration and the numbers are what a user gets. Prints a Markdown table.

    python benchmarks/prune.py                       # default model, 32 x 512 calibration
    python benchmarks/prune.py --scale               # random:opt-2.7b, Wanda and SparseGPT
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

OPTLAB = [sys.executable, "-m", "optlab.cli"]


def optlab(*args: str) -> dict:
    """Run one CLI command; its logs and progress bars pass through to our stderr."""
    done = subprocess.run([*OPTLAB, *args, "--json", "--force"], stdout=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"optlab {' '.join(args)} failed (exit {done.returncode}); see its log above")
    return json.loads(done.stdout)


def dense(model: str, seq_len: int, limit: int) -> dict:
    code = (
        "import json, resource; from optlab.api import load_model, evaluate; "
        f"r = evaluate(load_model({model!r}), ['ppl:wiki'], seq_len={seq_len}, limit={limit}, "
        "progress=False); "
        "r['peak_rss_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2; "
        "print(json.dumps(r))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    return {"perplexity": result["tasks"]["ppl:wiki"], "peak_rss_gb": result["peak_rss_gb"]}


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def quality(args: argparse.Namespace, work: Path) -> None:
    base = dense(args.model, args.seq_len, args.eval_limit)
    dense_ppl = base["perplexity"]["perplexity"]
    print(
        f"model {args.model}; calibration {args.n_calib} x {args.seq_len} tokens of wiki:calib; "
        f"evaluation: first {args.eval_limit} windows of {args.seq_len} tokens of wiki:eval\n"
    )
    row("method", "pattern", "perplexity", "vs dense", "prune s", "s / block", "peak RSS GB",
        "sparsity")  # fmt: skip
    row(*["---"] * 8)
    row("dense", "-", f"{dense_ppl:.2f}", "1.00x", "-", "-", f"{base['peak_rss_gb']:.2f}", 0)
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            r = optlab(
                "prune", args.model, "--method", method, "--pattern", pattern,
                "--n-calib", str(args.n_calib), "--seq-len", str(args.seq_len),
                "--eval-limit", str(args.eval_limit), "--out", str(work / method),
            )  # fmt: skip
            ppl = r["perplexity"]["perplexity"]
            row(method, pattern, f"{ppl:.2f}", f"{ppl / dense_ppl:.2f}x",
                f"{r['prune_seconds']:.1f}", f"{r['seconds_per_block']:.2f}",
                f"{r['peak_rss_gb']:.2f}", f"{r['sparsity']['total']:.5f}")  # fmt: skip


def scale(args: argparse.Namespace, work: Path) -> None:
    model = "random:opt-2.7b"
    print(f"{model}; calibration {args.scale_calib} x {args.seq_len} tokens\n")
    row("method", "prune s", "s / block", "peak RSS GB", "RSS / fp32 weights", "sparsity")
    row(*["---"] * 6)
    for method in args.methods.split(","):
        r = optlab(
            "prune", model, "--method", method, "--n-calib", str(args.scale_calib),
            "--seq-len", str(args.seq_len), "--no-eval", "--out", str(work / method),
        )  # fmt: skip
        row(method, f"{r['prune_seconds']:.0f}", f"{r['seconds_per_block']:.1f}",
            f"{r['peak_rss_gb']:.1f}", f"{r['peak_rss_gb'] / r['weights_gb']:.2f}x",
            f"{r['sparsity']['total']:.5f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt", help="with --scale: "
                        "wanda,sparsegpt")  # fmt: skip
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=40)
    parser.add_argument("--scale", action="store_true", help="the random:opt-2.7b scale run")
    parser.add_argument("--scale-calib", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="optlab-bench-") as work:
        (scale if args.scale else quality)(args, Path(work))


if __name__ == "__main__":
    main()
