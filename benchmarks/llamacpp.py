"""llama.cpp beside optlab: build it once into a cache outside the repository, then measure
GGUF files with it on the very token ids optlab scores.

llama.cpp comes from the ``llama-cpp-python`` sdist (pinned below), compiled for this CPU into
its own virtual environment under ``~/.cache/optlab/peers/llama-cpp`` (``OPTLAB_PEERS``
moves it): a few minutes on 2 idle cores, once. optlab never imports it; each measurement
runs in that environment's Python, so neither package's dependencies touch the other.

    python benchmarks/llamacpp.py --build                       # build (or check) the peer
    python benchmarks/llamacpp.py FILE.gguf [FILE.gguf ...]     # perplexity and speed
    python benchmarks/llamacpp.py --quantize F16.gguf q4_k_m OUT.gguf   # llama-quantize

Perplexity: exp of the mean NLL of every token after the first of each window, the windows
being optlab's ``wiki:eval`` windows (``token_windows``) passed as ids, so both tools score
the same tokens; each window is a fresh context. Speed, in a second context that keeps the
logits of the last position only (as a deployment does; perplexity needs them all): a prefill
of ``--prompt`` tokens, then ``--new-tokens`` greedy tokens one at a time (decode tok/s),
``--threads`` threads, best of ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

PIN = "llama-cpp-python==0.3.36"
# Not GGML_NATIVE: -march=native turns on AMX where the CPU lists it, and in a virtual
# machine that does not grant AMX tiles the first decode dies of SIGILL (seen here). The
# x86-64 vector extensions are chosen explicitly instead; no tools, examples or multimodal.
CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
              "-DGGML_BMI2=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
              "-DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF")  # fmt: skip
PEERS = Path(os.environ.get("OPTLAB_PEERS", Path.home() / ".cache" / "optlab" / "peers"))

# Runs inside the peer's environment: argv = file, job JSON on stdin, result JSON on stdout.
MEASURE = r"""
import json, math, sys, time
import numpy as np
from llama_cpp import Llama

job = json.load(sys.stdin)
windows, threads = job["windows"], job["threads"]
n_ctx = max([len(w) for w in windows] + [job["prompt"] + job["new_tokens"]])
llm = Llama(model_path=sys.argv[1], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
            n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
nll, count = 0.0, 0
for window in windows:
    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    nll += float((logz - logits[np.arange(len(window) - 1), window[1:]]).sum())
    count += len(window) - 1
# Speed without logits_all: a deployment computes the logits of the last position only.
del llm
llm = Llama(model_path=sys.argv[1], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
            n_threads=threads, n_threads_batch=threads, verbose=False)
prompt = windows[0][: job["prompt"]]
prefill, decode = [], []
for _ in range(job["rounds"]):
    llm.reset()
    start = time.perf_counter(); llm.eval(prompt); prefill.append(time.perf_counter() - start)
    token = int(np.argmax(llm.scores[len(prompt) - 1]))
    start = time.perf_counter()
    for _ in range(job["new_tokens"]):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode.append(time.perf_counter() - start)
print(json.dumps({"perplexity": math.exp(nll / count), "tokens": count,
                  "prefill_tok_s": len(prompt) / min(prefill),
                  "decode_tok_s": job["new_tokens"] / min(decode)}))
"""

QUANTIZE = r"""
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
# llama.cpp's own file types by the names llama-quantize takes (q4_k_m: LLAMA_FTYPE_MOSTLY_Q4_K_M)
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3].upper())
params.nthread = int(sys.argv[4])
code = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(code)
"""


def peer_python(build: bool = True) -> Path:
    """The Python of the cached llama.cpp environment, built first if ``build`` and missing."""
    home = PEERS / "llama-cpp"
    python = home / "bin" / "python"
    ready = python.is_file() and subprocess.run([str(python), "-c", "import llama_cpp"],
                                                capture_output=True).returncode == 0  # fmt: skip
    if ready:
        return python
    if not build:
        sys.exit(f"llama.cpp is not built in {home}: run python benchmarks/llamacpp.py --build")
    print(f"building llama.cpp ({PIN}) into {home}: a few minutes, once", file=sys.stderr)
    venv.create(home, with_pip=True, clear=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not optlab's packages
    env.update(CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
    # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would reinstall an old build
    pip = [str(python), "-m", "pip", "install", "-q", "--no-cache-dir", PIN, "numpy"]
    subprocess.run(pip, env=env, check=True)
    return python


def measure(
    path: str | Path,
    windows: list[list[int]],
    *,
    prompt: int = 256,
    new_tokens: int = 32,
    threads: int = 2,
    rounds: int = 2,
) -> dict:
    """llama.cpp's perplexity on ``windows`` (token ids) and its prefill / decode tok/s."""
    job = {"windows": windows, "prompt": prompt, "new_tokens": new_tokens, "threads": threads,
           "rounds": rounds}  # fmt: skip
    done = subprocess.run([str(peer_python()), "-c", MEASURE, str(path)], input=json.dumps(job),
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        sys.exit(f"llama.cpp could not measure {path}:\n{done.stderr[-2000:]}")
    return {"file_bytes": Path(path).stat().st_size, **json.loads(done.stdout)}


def quantize(source: str | Path, ftype: str, out: str | Path, threads: int = 2) -> Path:
    """llama-quantize ``source`` (an F16/F32 GGUF) into ``out`` with llama.cpp's ``ftype``
    mix (``q4_k_m``: its own per-tensor choice of K-quants)."""
    args = [str(source), str(out), ftype, str(threads)]
    done = subprocess.run([str(peer_python()), "-c", QUANTIZE, *args], capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode or not Path(out).is_file():
        sys.exit(f"llama-quantize {ftype} of {source} failed:\n{done.stderr[-2000:]}")
    return Path(out)


def wiki_windows(model: str, seq_len: int, limit: int) -> list[list[int]]:
    """optlab's ``wiki:eval`` perplexity windows for ``model``'s tokenizer, as id lists."""
    from optlab.core.data import load_text, token_windows
    from optlab.core.models import load_model

    tokenizer = load_model(model).tokenizer
    return token_windows(tokenizer, load_text("wiki:eval"), seq_len, limit=limit).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", help="GGUF files to measure")
    parser.add_argument("--build", action="store_true", help="build the peer (once) and stop")
    parser.add_argument("--quantize", nargs=3, metavar=("SOURCE", "FTYPE", "OUT"))
    parser.add_argument("--model", default="default", help="whose tokenizer makes the windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.build:
        print(peer_python())
        return
    if args.quantize:
        print(quantize(*args.quantize, threads=args.threads))
        return
    windows = wiki_windows(args.model, args.seq_len, args.eval_limit)
    print("| file | MB | perplexity | prefill tok/s | decode tok/s |\n|---|---|---|---|---|")
    for path in args.files:
        r = measure(path, windows, prompt=args.prompt, new_tokens=args.new_tokens,
                    threads=args.threads, rounds=args.rounds)  # fmt: skip
        print(
            f"| {Path(path).name} | {r['file_bytes'] / 1e6:.1f} | {r['perplexity']:.2f} | "
            f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
