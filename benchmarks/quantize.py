"""Quantization benchmark: perplexity, real size against FP16 and speed of each configuration,
optlab beside llama.cpp on the same weights and windows.

Rows: the fp32 model; uniform RTN at 8/4/3 bits; GPTQ at 4/3 bits; and every sensitivity
(cmpq, pmpq, tdmpq) allocating bits at average 3.5 / 4 / 4.5 bits. Every configuration runs
in its own process through the CLI (`optlab quantize ... --json`); a sensitivity is scored
once and its later budgets reuse the scores (`--scores-from`). Perplexity and speed are
measured in a fresh process that reloads the saved run (`load_model(RUN)`, packed weights),
the fp32 model once the same way. Decoding is optlab's static-cache greedy loop with its
compiled one-token step (`--decode compiled`, after an untimed compiling warm-up) or Hugging
Face `generate` (`--decode generate`); prefill and decode are the fastest of `--repeats` runs,
on both sides. Prints Markdown.

`--llamacpp` adds a second table from the same run, every file measured by llama.cpp (built
once by `benchmarks/llamacpp.py --build` into a cache outside the repository) on the very
token windows optlab scores, and read back by optlab (transformers' GGUF reader) for its
perplexity: each optlab run above exported (`optlab export RUN`); optlab's uniform Q4_1 and
Q8_0 exports; llama.cpp's own `llama-quantize` mixes (`--mixes`) made from optlab's F16 export
of the same weights; and optlab's allocation over GGUF types (`optlab quantize --format gguf`,
one per `--gguf-sensitivities`) at the byte size of the first mix (Q4_K_M by default).

    python benchmarks/quantize.py                          # default model
    python benchmarks/quantize.py --configs rtn4,tdmpq@4 --llamacpp   # beside llama.cpp
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

from decode import load_average  # benchmarks/decode.py, beside this script

OPTLAB = [sys.executable, "-m", "optlab.cli"]
UNIFORM = ["rtn8", "rtn4", "rtn3", "gptq4", "gptq3"]
ALLOCATED = [f"{s}@{b}" for s in ("cmpq", "pmpq", "tdmpq") for b in ("3.5", "4", "4.5")]
MIXES = "q4_k_m,q4_0,q5_k_m,q8_0"  # llama-quantize's names; the first sets the allocation's bytes

# argv: model, decode (compiled | generate | none: perplexity only), threads, seq_len, limit,
# prompt tokens, new tokens, repeats (timed runs of each; the fastest kept). Prints one JSON line.
MEASURE = """
import json, sys, time, torch
from optlab.api import load_model
from optlab.core.decode import greedy
from optlab.eval.perplexity import wiki_perplexity
model, decode = sys.argv[1:3]
threads, seq_len, limit, prompt, new, repeats = map(int, sys.argv[3:])
torch.set_num_threads(threads)
lm = load_model(model)
result = {"perplexity": wiki_perplexity(lm, seq_len, limit, progress=False)["perplexity"]}
torch.manual_seed(0)
prompt = torch.randint(0, min(lm.model.config.vocab_size, 256), (1, prompt))
short = prompt[0, :16].tolist()
paths = {
    "compiled": lambda: greedy(lm.model, [short], new, eos=(), compile=True),
    "generate": lambda: lm.model.generate(prompt[:, :16], max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False, pad_token_id=0),
}
def fastest(run):
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); run(); times.append(time.perf_counter() - start)
    return min(times)

if decode != "none":
    with torch.no_grad():
        lm.model(prompt[:, :8])  # warm-up (the compiled step builds its own layouts)
        prefill = fastest(lambda: lm.model(prompt))
        paths[decode]()  # warm-up: compiles the step
        seconds = fastest(paths[decode])
    result.update(prefill_tok_s=prompt.shape[1] / prefill, decode_tok_s=new / seconds)
print(json.dumps(result))
"""


def optlab(*args: str) -> dict:
    done = subprocess.run([*OPTLAB, *args, "--json", "--force"], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"optlab {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def measure(model: str | Path, args: argparse.Namespace, decode: str | None = None) -> dict:
    """wiki:eval perplexity, prefill and decoding speed of a model, run or GGUF file, in a
    fresh process (``decode="none"``: perplexity only)."""
    numbers = (args.threads, args.seq_len, args.eval_limit, args.prompt, args.new_tokens,
               args.repeats)  # fmt: skip
    command = [sys.executable, "-c", MEASURE, str(model), decode or args.decode, *map(str, numbers)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"measuring {model} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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


def beside_llamacpp(args: argparse.Namespace, runs: dict[str, dict], fp16_mb: float,
                    work: Path) -> None:  # fmt: skip
    """The second table: every GGUF file of the same weights in llama.cpp and read back by
    optlab. ``runs``: the optlab runs of the first table (name -> its row's figures)."""
    import llamacpp  # benchmarks/llamacpp.py, beside this script

    windows = llamacpp.wiki_windows(args.model, args.seq_len, args.eval_limit)
    files: list[tuple[str, str, Path, dict | None]] = []  # name, made by, file, optlab's row
    for name, run in runs.items():
        path = work / f"{name.replace('@', '-')}.gguf"
        optlab("export", run["out"], "--out", str(path))
        files.append((name, "optlab quantize, then optlab export", path, run))
    for qtype in ("q4_1", "q8_0"):
        path = work / f"export-{qtype}.gguf"
        optlab("export", args.model, "--type", qtype, "--out", str(path))
        files.append((qtype.upper(), "optlab export", path, None))
    f16 = work / "export-f16.gguf"
    optlab("export", args.model, "--type", "f16", "--embed-type", "f16", "--out", str(f16))
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    for mix in mixes:
        path = llamacpp.quantize(f16, mix, work / f"llama-{mix}.gguf", threads=args.threads)
        files.append((mix.upper(), "llama-quantize of optlab's F16 export", path, None))
    sensitivities = [m.strip() for m in args.gguf_sensitivities.split(",") if m.strip()]
    budget = (work / f"llama-{mixes[0]}.gguf").stat().st_size / 1e6 if mixes else 0.0
    for method in sensitivities if budget else ():  # allocated at the first mix's bytes
        out = work / f"gguf-{method}"
        optlab("quantize", args.model, "--format", "gguf", "--sensitivity", method, "--max-size",
               f"{budget:.6f}", "--n-calib", str(args.n_calib), "--seq-len", str(args.seq_len),
               "--no-eval", "--out", str(out))  # fmt: skip
        files.append((f"{method} at {mixes[0].upper()}'s bytes", "optlab quantize --format gguf",
                      out / "model.gguf", None))  # fmt: skip
    print(f"\nllama.cpp ({llamacpp.PIN}, {args.threads} threads) on the same {len(windows)} "
          f"windows; optlab ppl: the file read back by optlab\n")  # fmt: skip
    row("file", "made by", "file MB", "vs FP16", "llama.cpp ppl", "optlab ppl",
        "llama.cpp prefill tok/s", "llama.cpp decode tok/s",
        "optlab decode tok/s (its run)")  # fmt: skip
    row(*["---"] * 9)
    for name, made_by, path, run in files:
        theirs = llamacpp.measure(path, windows, prompt=args.prompt, new_tokens=args.new_tokens,
                                  threads=args.threads, rounds=args.repeats)  # fmt: skip
        ours = measure(path, args, decode="none")["perplexity"]
        mb = theirs["file_bytes"] / 1e6
        row(name, made_by, f"{mb:.1f}", f"{fp16_mb / mb:.2f}x",
            f"{theirs['perplexity']:.2f}", f"{ours:.2f}", f"{theirs['prefill_tok_s']:.0f}",
            f"{theirs['decode_tok_s']:.1f}",
            f"{run['decode_tok_s']:.1f}" if run else "-")  # fmt: skip


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
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed prefills and decodes of each model, optlab's and "
                             "llama.cpp's alike (the fastest kept: one timing swings by a "
                             "quarter here)")  # fmt: skip
    parser.add_argument("--decode", choices=("compiled", "generate"), default="compiled",
                        help="optlab's compiled static-cache step, or HF generate")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--llamacpp", action="store_true", help="add the llama.cpp table")
    parser.add_argument("--mixes", default=MIXES, help="llama-quantize types (--llamacpp)")
    parser.add_argument("--gguf-sensitivities", default="tdmpq,cmpq",
                        help="GGUF allocations at the first mix's bytes (--llamacpp)")  # fmt: skip
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1 (the best of the timed runs is kept)")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs:
        parser.error("--configs names no configuration")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    common = ["--n-calib", str(args.n_calib), "--seq-len", str(args.seq_len), "--no-eval",
              "--group-size", args.group_size,
              *(["--embed-bits", args.embed_bits] if args.embed_bits else [])]  # fmt: skip
    print(
        f"model {args.model}; calibration {args.n_calib} x {args.seq_len} tokens of wiki:calib; "
        f"perplexity: first {args.eval_limit} windows of {args.seq_len} tokens of wiki:eval; "
        f"group size {args.group_size}; allocation widths {args.widths}; embeddings "
        f"{args.embed_bits or 16} bits; speed: {args.threads} threads, prefill "
        f"{args.prompt} tokens, greedy decoding ({args.decode}) of {args.new_tokens} tokens, "
        f"batch 1; load average {load_average()}\n"
    )
    row("config", "avg bits", "bits incl. scales", "perplexity", "vs fp32", "file MB",
        "vs FP16", "prefill tok/s", "decode tok/s", "kernels")  # fmt: skip
    row(*["---"] * 10)
    base = measure(args.model, args)
    fp16_mb = 0.0  # set by the first configuration's run
    scored: dict[str, str] = {}
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="optlab-bench-") as work:
        for config in configs:
            out = str(Path(work) / config.replace("@", "-"))
            r = optlab("quantize", args.model, *flags(config, args, scored), *common, "--out", out)
            if "@" in config:
                scored.setdefault(config.split("@")[0], out)
            if not fp16_mb:
                fp16_mb = r["fp16_bytes"] / 1e6
                row("fp32", 32, 32, f"{base['perplexity']:.2f}", "1.00x", f"{2 * fp16_mb:.1f}",
                    "0.50x", f"{base['prefill_tok_s']:.0f}", f"{base['decode_tok_s']:.1f}",
                    "-")  # fmt: skip
            s = measure(out, args)
            runs[config] = {"out": out, **s}
            kernels = ", ".join(f"{k} {n}" for k, n in sorted(r["kernels"].items()))
            row(config, f"{r['avg_bits']:.2f}", f"{r['effective_bits']:.2f}",
                f"{s['perplexity']:.2f}", f"{s['perplexity'] / base['perplexity']:.2f}x",
                f"{r['file_mb']:.1f}", f"{r['compression_vs_fp16']:.2f}x",
                f"{s['prefill_tok_s']:.0f}", f"{s['decode_tok_s']:.1f}",
                kernels or "-")  # fmt: skip
        if args.llamacpp:
            beside_llamacpp(args, runs, fp16_mb, Path(work))


if __name__ == "__main__":
    main()
