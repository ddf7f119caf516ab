"""Multi-exit fine-tuning benchmark: per-exit top-1 agreement with the final layer, CE and
accuracy on held-out code windows (the test split of code:stdlib), before and after
`optlab exit train`, in one run through the CLI.

    python benchmarks/early_exit_train.py                   # 30 steps: ~30 min on 2 CPU cores
    python benchmarks/early_exit_train.py --steps 300 --batch-size 8 --context-length 256 \\
        --lr 1e-5 --device cuda                              # the paper's settings, one GPU
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from prune import optlab, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--exits", default="auto")
    parser.add_argument("--weights", default="geometric")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--lr", default="1e-4", help="1e-4 shows a change in a short CPU run; "
                        "the paper's is 1e-5 over 5 epochs")  # fmt: skip
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="optlab-bench-") as work:
        m = optlab("exit", "train", args.model, "--data", "code:stdlib", "--exits", args.exits,
                   "--weights", args.weights, "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--context-length", str(args.context_length),
                   "--lr", args.lr, "--eval-windows", str(args.eval_windows),
                   "--no-recompute-exits", "--device", args.device,
                   "--out", str(Path(work) / "run"))  # fmt: skip
    print(f"model {args.model}, exits {m['exits']}, {args.weights} weights; {args.steps} steps "
          f"of {args.batch_size} x {m['context_length']} tokens of code:stdlib (train), lr "
          f"{args.lr} constant; {m['train_seconds']:.0f} s training, peak RSS "
          f"{m['peak_rss_gb']:.1f} GB; {m['eval_windows']} held-out windows of the "
          f"{m['eval_split']} split\n")  # fmt: skip
    row("exit", "weight", "agreement before", "agreement after", "CE before", "CE after",
        "accuracy before", "accuracy after")  # fmt: skip
    row(*["---"] * 8)
    for layer, weight in zip(m["exits"], m["weights"], strict=True):
        b, a = m["before"][str(layer)], m["after"][str(layer)]
        row(layer, f"{weight:.3f}", f"{b['agreement']:.3f}", f"{a['agreement']:.3f}",
            f"{b['ce']:.2f}", f"{a['ce']:.2f}", f"{b['accuracy']:.3f}",
            f"{a['accuracy']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
