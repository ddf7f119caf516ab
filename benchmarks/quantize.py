"""Quantization benchmark: perplexity, real size against FP16 and speed of each configuration.

Rows: the fp32 model; uniform RTN at 8/4/3 bits; GPTQ at 4/3 bits; and every sensitivity
(cmpq, pmpq, tdmpq) allocating bits at average 3.5 / 4 / 4.5 bits. Every configuration runs
in its own process through the CLI (`optlab quantize ... --json`); a sensitivity is scored
once and its later budgets reuse the scores (`--scores-from`). Perplexity and speed are
measured in a fresh process that reloads the saved run (`load_model(RUN)`, packed weights),
the fp32 model once the same way. Prints Markdown.

    python benchmarks/quantize.py                          # default model
    python benchmarks/quantize.py --model tiny:llama --eval-limit 2 --n-calib 4 \\
        --seq-len 64 --configs rtn4,gptq4,tdmpq@4          # a smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

OPTLAB = [sys.executable, "-m", "optlab.cli"]
UNIFORM = ["rtn8", "rtn4", "rtn3", "gptq4", "gptq3"]
ALLOCATED = [f"{s}@{b}" for s in ("cmpq", "pmpq", "tdmpq") for b in ("3.5", "4", "4.5")]

MEASURE = """
import json, sys, time, torch
from optlab.api import load_model
from optlab.eval.perplexity import wiki_perplexity
model, seq_len, limit, prompt, new = sys.argv[1], *map(int, sys.argv[2:])
lm = load_model(model)
ppl = wiki_perplexity(lm, seq_len, limit, progress=False)["perplexity"]
torch.manual_seed(0)
prompt = torch.randint(0, min(lm.model.config.vocab_size, 256), (1, prompt))
with torch.no_grad():
    lm.model(prompt[:, :8])  # warm-up: builds kernel layouts
    start = time.perf_counter(); lm.model(prompt); prefill = time.perf_counter() - start
    start = time.perf_counter()
    lm.model.generate(prompt[:, :16], max_new_tokens=new, min_new_tokens=new, do_sample=False,
                      pad_token_id=0)
    decode = time.perf_counter() - start
print(json.dumps({"perplexity": ppl, "prefill_tok_s": prompt.shape[1] / prefill,
                  "decode_tok_s": new / decode}))
"""


def optlab(*args: str) -> dict:
    done = subprocess.run([*OPTLAB, *args, "--json", "--force"], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"optlab {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def measure(model: str, args: argparse.Namespace) -> dict:
    """wiki:eval perplexity, prefill and decoding speed of a model or run, in a fresh process."""
    numbers = (args.seq_len, args.eval_limit, args.prompt, args.new_tokens)
    done = subprocess.run([sys.executable, "-c", MEASURE, model, *map(str, numbers)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        sys.exit(f"measuring {model} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def flags(config: str, args: argparse.Namespace, scored: dict[str, str]) -> list[str]:
    """CLI flags of one configuration name: rtn4, gptq3, tdmpq@4.5 ... (``scored``: the run
    that first scored each sensitivity)."""
    if "@" in config:
        method, bits = config.split("@")
        reuse = ["--scores-from", scored[method]] if method in scored else []
        return ["--sensitivity", method, "--avg-bits", bits, "--widths", args.widths, *reuse]
    method, bits = config[:-1], config[-1]
    return ["--uniform", bits, *(["--gptq"] if method == "gptq" else [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--configs", default=",".join(UNIFORM + ALLOCATED))
    parser.add_argument("--widths", default="8,4,3", help="candidates of the allocations")
    parser.add_argument("--group-size", default="128")
    parser.add_argument("--embed-bits", help="also pack embeddings + LM head (default fp16)")
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=40)
    parser.add_argument("--prompt", type=int, default=256, help="prefill tokens for speed")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens for speed")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    common = ["--n-calib", str(args.n_calib), "--seq-len", str(args.seq_len), "--no-eval",
              "--group-size", args.group_size,
              *(["--embed-bits", args.embed_bits] if args.embed_bits else [])]  # fmt: skip
    print(
        f"model {args.model}; calibration {args.n_calib} x {args.seq_len} tokens of wiki:calib; "
        f"perplexity: first {args.eval_limit} windows of {args.seq_len} tokens of wiki:eval; "
        f"group size {args.group_size}; allocation widths {args.widths}; embeddings "
        f"{args.embed_bits or 16} bits; speed: prefill "
        f"{args.prompt} tokens, greedy decoding of {args.new_tokens} tokens, batch 1\n"
    )
    row("config", "avg bits", "bits incl. scales", "perplexity", "vs fp32", "file MB",
        "vs FP16", "prefill tok/s", "decode tok/s", "kernels")  # fmt: skip
    row(*["---"] * 10)
    base = measure(args.model, args)
    fp16_mb = None
    scored: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="optlab-bench-") as work:
        for config in configs:
            out = str(Path(work) / config.replace("@", "-"))
            r = optlab("quantize", args.model, *flags(config, args, scored), *common, "--out", out)
            if "@" in config:
                scored.setdefault(config.split("@")[0], out)
            if fp16_mb is None:
                fp16_mb = r["fp16_bytes"] / 1e6
                row("fp32", 32, 32, f"{base['perplexity']:.2f}", "1.00x", f"{2 * fp16_mb:.1f}",
                    "0.50x", f"{base['prefill_tok_s']:.0f}", f"{base['decode_tok_s']:.1f}",
                    "-")  # fmt: skip
            s = measure(out, args)
            kernels = ", ".join(f"{k} {n}" for k, n in sorted(r["kernels"].items()))
            row(config, f"{r['avg_bits']:.2f}", f"{r['effective_bits']:.2f}",
                f"{s['perplexity']:.2f}", f"{s['perplexity'] / base['perplexity']:.2f}x",
                f"{r['file_mb']:.1f}", f"{r['compression_vs_fp16']:.2f}x",
                f"{s['prefill_tok_s']:.0f}", f"{s['decode_tok_s']:.1f}",
                kernels or "-")  # fmt: skip


if __name__ == "__main__":
    main()
