"""SKeB benchmark: unlearn country facts from a model, then probe the base and the unlearned
model with plain and persuasive framings; print recall per framing and relative recovery.

Each step runs in its own process through the CLI (`optlab unlearn ... --json`, then
`optlab audit skeb RUN --base MODEL ... --json`); the facts probed are the unlearning run's
own forget set (`RUN/forget.jsonl`). Prints a Markdown table for BENCHMARKS.md.

    python benchmarks/skeb.py                               # default model, facts scenario
    python benchmarks/skeb.py --unlearned runs/facts-ga     # audit an existing unlearning run
    python benchmarks/skeb.py --model tiny:llama --unlearned RUN --limit 2   # a smoke test
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
    done = subprocess.run([*OPTLAB, *args, "--json", "--force"], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"optlab {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="the base model (default: default)")
    parser.add_argument("--unlearned", help="an existing unlearning run: skip the unlearning")
    parser.add_argument("--method", default="ga_kl_rand", help="unlearning method")
    parser.add_argument("--steps", type=int, default=100, help="unlearning steps (100)")
    parser.add_argument("--lr", type=float, default=1e-5, help="unlearning learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, help="probe only the first N forgotten facts")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="optlab-bench-") as tmp:
        work = Path(args.out or tmp)
        unlearned = args.unlearned
        if unlearned is None:
            unlearned = str(work / "unlearned")
            u = optlab("unlearn", args.model, "--scenario", "facts", "--method", args.method,
                       "--steps", str(args.steps), "--lr", str(args.lr), "--seed",
                       str(args.seed), "--out", unlearned)  # fmt: skip
            print(f"unlearning: {args.method}, {args.steps} steps, lr {args.lr}: "
                  f"FA {u.get('FA')}, RA {u.get('RA')} ({unlearned})\n")  # fmt: skip
        limit = ["--limit", str(args.limit)] if args.limit else []
        r = optlab("audit", "skeb", unlearned, "--base", args.model, "--seed", str(args.seed),
                   "--max-new-tokens", str(args.max_new_tokens), *limit,
                   "--out", str(work / "skeb"))  # fmt: skip
    base, audited = r["models"]["base"], r["models"]["audited"]
    print(f"{r['facts']} forgotten facts x {len(audited['framings'])} framings; graph judge; "
          f"base {base['model']}, unlearned {unlearned}; probing took "
          f"{base['seconds']:.0f} s + {audited['seconds']:.0f} s\n")  # fmt: skip
    row("framing", "base recall", "unlearned recall (95% CI)", "unlearned recovery vs plain",
        "unlearned hallucinated", "base recovery vs plain")  # fmt: skip
    row(*["---"] * 6)
    for framing, s in audited["framings"].items():
        rec = s["recall"]
        plain = framing == "plain"
        row(framing, pct(base["framings"][framing]["recall"]["mean"]),
            f"{pct(rec['mean'])} ({pct(rec['low'])}-{pct(rec['high'])})",
            "-" if plain else pct(audited["recovery"][framing]),
            pct(s["hallucinated"]["mean"]),
            "-" if plain else pct(base["recovery"][framing]))  # fmt: skip
    fit = audited["regression"]["recall"]
    defined = {m: v["r2"] for m, v in fit["per_metric"].items() if v["r2"] is not None}
    best = max(defined, key=defined.get) if defined else None  # type: ignore[arg-type]
    combined = fit["combined_r2"]
    print(f"\nunlearned recall ~ M1-M9: combined R^2 "
          f"{'n/a' if combined is None else f'{combined:.3f}'}; best single metric "
          f"{best or 'n/a'}{f' (R^2 {defined[best]:.3f})' if best else ''}")  # fmt: skip


if __name__ == "__main__":
    main()
