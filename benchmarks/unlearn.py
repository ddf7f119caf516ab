"""Unlearning benchmark: each method on the facts and book scenarios, before vs after.

Each scenario runs as one `optlab unlearn sweep ... --json` process (the known facts, the
teaching and the oracle are computed once and shared by the methods). Prints Markdown tables:
forget accuracy / memorisation before and after, retain accuracy, perplexity change, MIA AUC
(LOSS attack) and the logistic-regression MIA, and training time.

    python benchmarks/unlearn.py                                  # default model: hours on CPU
    python benchmarks/unlearn.py --model runs/x/model --steps 5 --eval-seq-len 64   # smoke
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from prune import optlab, row

METHODS = "ga,ga_kl_rand,graddiff,npo,retain_only"


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def change(before: float, after: float) -> str:
    if not before or math.isnan(before) or math.isnan(after):
        return "-"
    return f"{100 * (after - before) / before:+.0f}%"


def sweep(args: argparse.Namespace, scenario: str, work: Path) -> list[dict]:
    flags = ["--methods", args.methods, "--seeds", args.seeds, "--steps", str(args.steps),
             "--lr", str(args.lr), "--batch-size", str(args.batch_size),
             "--retain-weight", str(args.retain_weight),
             "--samples", str(args.samples), "--eval-limit", str(args.eval_limit),
             "--eval-seq-len", str(args.eval_seq_len), "--max-new-tokens",
             str(args.max_new_tokens), "--device", args.device]  # fmt: skip
    if args.lora:
        flags.append("--lora")
    if scenario == "book":
        flags += ["--teach-steps", str(args.teach_steps), "--teach-lr", str(args.teach_lr)]
    result = optlab("unlearn", "sweep", args.model, "--scenario", scenario, *flags,
                    "--out", str(work / scenario))  # fmt: skip
    return result["rows"]


def facts_table(rows: list[dict]) -> None:
    row("method", "seed", "FA before", "FA after", "FA change", "RA before", "RA after",
        "RA change", "ppl before", "ppl after", "ppl change", "MIA AUC (LOSS)", "MIA (LR)",
        "train s")  # fmt: skip
    row(*["---"] * 14)
    for r in rows:
        row(r["method"], r["seed"], fmt(r["base_FA"]), fmt(r["FA"]),
            change(r["base_FA"], r["FA"]), fmt(r["base_RA"]), fmt(r["RA"]),
            change(r["base_RA"], r["RA"]), fmt(r["base_ppl"], 2), fmt(r["ppl"], 2),
            change(r["base_ppl"], r["ppl"]), fmt(r["mia_loss"]), fmt(r["MIA"]),
            f"{r['train_seconds']:.0f}")  # fmt: skip


def book_table(rows: list[dict]) -> None:
    row("method", "seed", "ROUGE-L untaught", "taught", "unlearned", "exact untaught",
        "taught", "unlearned", "ppl before", "ppl after", "ppl change", "MIA AUC (LOSS)",
        "train s")  # fmt: skip
    row(*["---"] * 13)
    for r in rows:
        row(r["method"], r["seed"], fmt(r.get("untaught_rougeL")), fmt(r["base_rougeL"]),
            fmt(r["rougeL"]), fmt(r.get("untaught_exact_match")), fmt(r["base_exact_match"]),
            fmt(r["exact_match"]), fmt(r["base_ppl"], 2), fmt(r["ppl"], 2),
            change(r["base_ppl"], r["ppl"]), fmt(r["mia_loss"]),
            f"{r['train_seconds']:.0f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--scenarios", default="facts,book")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--retain-weight", type=float, default=1.0)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--teach-steps", type=int, default=100, help="book: LoRA teaching")
    parser.add_argument("--teach-lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--eval-limit", type=int, default=20)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    trained = "LoRA on q/v" if args.lora else "all weights"
    print(f"model {args.model} on {args.device}; {args.steps} steps, lr {args.lr}, "
          f"batch {args.batch_size}, retain weight {args.retain_weight}, {trained}; "
          f"seeds {args.seeds}; perplexity on "
          f"{args.eval_limit} x {args.eval_seq_len} tokens of wiki:eval\n")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="optlab-bench-") as work:
        for scenario in args.scenarios.split(","):
            rows = sweep(args, scenario, Path(work))
            print(f"\n{scenario}\n")
            (facts_table if scenario == "facts" else book_table)(rows)


if __name__ == "__main__":
    main()
