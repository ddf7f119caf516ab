"""Decoding benchmark: prefill and greedy decode tok/s of optlab fp32 and packed models, before
and after the static-cache decoder (`optlab.core.decode.greedy`) and its compiled step.

Models: the fp32 model, and packed runs quantized here through the CLI (uniform RTN at 4 bits,
groups of --group-size; `rtn4` keeps the embedding table and LM head at 16 bits, `rtn4-e8`
packs them at 8 bits, as GGUF files do). Each model is measured in a fresh process on the same
random prompts, --threads threads:

* prefill: one forward over --prompt tokens (best of --repeats);
* decode, from a 16-token prompt, --new-tokens tokens, batch 1, best of --repeats:
  `generate` (Hugging Face generate with its dynamic cache: how optlab decoded before),
  `static` (greedy over the static cache, eager) and `compiled` (its one-token step through
  torch.compile, after one untimed warm-up generation that compiles it; the compile time is
  reported).

The tokens of every path are checked against `generate`'s: the compiled step's packed 4- and
8-bit layers use torch's int4 GEMM (tinygemm) in bf16, so its tokens may differ from fp32's;
the table says how many agree. The load average is printed before and after each model: the
machine may be shared, and ratios within one run are what count. `--device cuda` runs the
same on a GPU.

    python benchmarks/decode.py                          # default model, 2 threads
    python benchmarks/decode.py --model tiny:llama --configs rtn4 --new-tokens 8  # smoke test
    python benchmarks/decode.py --device cuda            # on a GPU (benchmarks/decode_gpu.py)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

OPTLAB = [sys.executable, "-m", "optlab.cli"]
CONFIGS = {"rtn4": [], "rtn4-e8": ["--embed-bits", "8"]}

MEASURE = """
import json, sys, time, torch
from optlab.api import load_model
from optlab.core.decode import greedy
model, device, threads, prompt_len, new, repeats = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
torch.set_num_threads(threads)
lm = load_model(model)
lm.model.to(device)
torch.manual_seed(0)
prompt = torch.randint(0, min(lm.model.config.vocab_size, 256), (1, prompt_len)).to(device)
short = prompt[:, :16]

def best(run):
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); out = run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), out

with torch.no_grad():
    lm.model(prompt[:, :8])  # warm-up
    prefill, _ = best(lambda: lm.model(prompt))
    paths = {
        "generate": lambda: lm.model.generate(short, max_new_tokens=new, min_new_tokens=new,
                                              do_sample=False, pad_token_id=0)[0, 16:].tolist(),
        "static": lambda: greedy(lm.model, [short[0].tolist()], new, eos=())[0],
        "compiled": lambda: greedy(lm.model, [short[0].tolist()], new, eos=(), compile=True)[0],
    }
    start = time.perf_counter(); paths["compiled"](); compile_s = time.perf_counter() - start
    result = {"prefill_tok_s": prompt_len / prefill, "compile_s": compile_s}
    tokens = {}
    for name, run in paths.items():
        seconds, tokens[name] = best(run)
        result[name + "_tok_s"] = new / seconds
    reference = tokens["generate"]
    result["agree"] = {n: sum(a == b for a, b in zip(t, reference)) for n, t in tokens.items()}
    kernels = {}
    for module in lm.model.modules():
        if hasattr(module, "kernel_name"):
            name = module.kernel_name(compiled=True)
            kernels[name] = kernels.get(name, 0) + 1
    narrow = getattr(lm.model.get_output_embeddings(), "_narrow", {}).get("weight")
    if narrow is not None:  # core.decode.HalfWidthHead: the head read at 16 bits
        kernels["head " + str(narrow.dtype).removeprefix("torch.")] = 1
    result["kernels"] = kernels
print(json.dumps(result))
"""


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def measure(model: str, args: argparse.Namespace) -> dict:
    numbers = (args.threads, args.prompt, args.new_tokens, args.repeats)
    done = subprocess.run([sys.executable, "-c", MEASURE, model, args.device, *map(str, numbers)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        sys.exit(f"measuring {model} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def quantize(model: str, config: str, out: str, group_size: str) -> None:
    args = ["quantize", model, "--uniform", "4", "--group-size", group_size, "--no-eval",
            *CONFIGS[config], "--out", out, "--json", "--force"]  # fmt: skip
    done = subprocess.run([*OPTLAB, *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"optlab {' '.join(args)} failed:\n{done.stderr}")


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="packed runs to make and measure, or existing runs")  # fmt: skip
    parser.add_argument("--group-size", default="64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=256, help="prefill tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (best kept)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1 (the best of the timed runs is kept)")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for config in configs:
        if config not in CONFIGS and not Path(config).is_dir():
            sys.exit(f"unknown config {config!r}; choose from {', '.join(CONFIGS)} or a run")
    print(f"model {args.model}; {args.threads} threads on {args.device}; prefill {args.prompt} "
          f"tokens; greedy decoding of {args.new_tokens} tokens from 16, batch 1; best of "
          f"{args.repeats}; packed: uniform RTN 4 bits, groups of {args.group_size}\n")  # fmt: skip
    row("model", "load before/after (1/5/15 min)", "prefill tok/s", "generate tok/s",
        "static tok/s", "compiled tok/s", "compile s", "tokens equal to generate's",
        "kernels (compiled)")  # fmt: skip
    row(*["---"] * 9)
    results = {}
    with tempfile.TemporaryDirectory(prefix="optlab-decode-") as work:
        for name in ["fp32", *configs]:
            path = args.model
            if name in CONFIGS:
                path = str(Path(work) / name)
                quantize(args.model, name, path, args.group_size)
            elif name != "fp32":
                path = name  # an existing run
            before = load_average()
            r = results[name] = measure(path, args)
            agree = ", ".join(f"{k} {v}/{args.new_tokens}" for k, v in r["agree"].items()
                              if k != "generate")  # fmt: skip
            kernels = ", ".join(f"{k} {n}" for k, n in sorted(r["kernels"].items())) or "-"
            row(name, f"{before} / {load_average()}", f"{r['prefill_tok_s']:.0f}",
                f"{r['generate_tok_s']:.1f}", f"{r['static_tok_s']:.1f}",
                f"{r['compiled_tok_s']:.1f}", f"{r['compile_s']:.0f}", agree, kernels)  # fmt: skip
    base = results["fp32"]
    print()
    for name in configs:
        r = results[name]
        print(f"{name}: compiled decode {r['compiled_tok_s'] / base['compiled_tok_s']:.2f}x fp32 "
              f"compiled, {r['compiled_tok_s'] / base['generate_tok_s']:.2f}x fp32 generate, "
              f"{r['compiled_tok_s'] / r['generate_tok_s']:.2f}x its own generate; prefill "
              f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x fp32")  # fmt: skip
    print(f"fp32: compiled decode {base['compiled_tok_s'] / base['generate_tok_s']:.2f}x generate")


if __name__ == "__main__":
    main()
