"""Where a packed decoding step's time goes: each decoding kernel on one input row of a layer
(best of --repeats; the small layers' weights stay in cache, the 49152-row head's cannot), and
with `--profile RUN` a torch.profiler table of the compiled greedy steps of a model or run (the
figures of BENCHMARKS.md's "torch's int4 GEMM in the compiled CPU decoder" and "The LM head
read at 16 bits").

    python benchmarks/decode_kernels.py --threads 1
    python benchmarks/decode_kernels.py --threads 2 --profile RUN
    python benchmarks/decode_kernels.py --threads 2 --profile RUN --prompt 256  # a 512-slot cache
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from optlab.core.decode import HalfWidthHead
from optlab.quant.linear import QuantLinear, matvec, matvec_layout, tinygemm
from optlab.quant.quantizer import quantize_rtn


def best_ms(run: Callable[[], object], repeats: int) -> float:
    for _ in range(5):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def kernels(out: int, cols: int, bits: int, group: int, repeats: int) -> dict[str, float]:
    weight = torch.randn(out, cols) * 0.05
    qw = quantize_rtn(weight, bits, group)
    layer = QuantLinear.from_quantized(qw)
    x = torch.randn(1, cols)
    layout = matvec_layout(qw.codes, qw.scales.half(), qw.zeros, bits, group)
    compiled = torch.compile(matvec, dynamic=False)
    int4, scale_and_offset = layer._tinygemm()
    # an unpacked layer of fp16 values (a quantized run's FP16 head) as the compiled step reads it
    plain = nn.Linear(cols, out, bias=False).requires_grad_(False)
    plain.weight.copy_(weight.half().float())
    half_width = HalfWidthHead.of(plain)
    half_width.prepare_decode()
    half_width_compiled = torch.compile(half_width, dynamic=False)
    times = {
        "fp32 F.linear": best_ms(lambda: F.linear(x, weight), repeats),
        "matvec (compiled)": best_ms(lambda: compiled(x, *layout, bits), repeats),
        "tinygemm (bf16 in)": best_ms(lambda: tinygemm(x, int4, scale_and_offset, group), repeats),
        "fp16 values, HalfWidthHead (compiled)": best_ms(lambda: half_width_compiled(x), repeats),
    }
    if bits == 4:  # the same kernel fed fp32: no fast path
        fp32_scales = scale_and_offset.float()
        times["int4 GEMM fed fp32"] = best_ms(
            lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4, group, fp32_scales),
            repeats,
        )
    return times


def profile(model: str, tokens: int, prompt_tokens: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from optlab.api import load_model
    from optlab.core.decode import greedy

    lm = load_model(model)
    prompt = [20 + i % 200 for i in range(prompt_tokens)]
    # compiles the step for the profiled run's cache length (a shorter warm-up would leave a
    # second compilation, for the longer cache, inside the profile)
    greedy(lm.model, [prompt], tokens + 1, eos=(), compile=True)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        greedy(lm.model, [prompt], tokens + 1, eos=(), compile=True)
    events = prof.key_averages()
    print(f"\n{model}: {tokens} compiled steps (and the eager prefill of {prompt_tokens} tokens)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    graph = sum(e.cpu_time_total for e in events if e.key.startswith("## Call CompiledFxGraph"))
    lookup = sum(e.self_cpu_time_total for e in events if e.key == "TorchDynamo Cache Lookup")
    print(f"compiled graph: {graph / 1e3 / tokens:.2f} ms a step")
    print(f"dynamo's guard check: {lookup / 1e3 / tokens:.2f} ms a step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--profile", metavar="MODEL_OR_RUN", help="also profile its decoding")
    parser.add_argument("--tokens", type=int, default=64, help="steps to profile")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens of the profile")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1 (the best of the timed runs is kept)")
    torch.set_num_threads(args.threads)
    shapes = [(1536, 576, 4, 64), (576, 576, 4, 64), (1536, 576, 8, 64), (49152, 576, 8, 32)]
    print(f"{args.threads} thread(s), one input row, best of {args.repeats}, ms\n")
    rows = [(shape, kernels(*shape, args.repeats)) for shape in shapes]
    names = list(dict.fromkeys(name for _, times in rows for name in times))
    print("| out x in, bits, group | " + " | ".join(names) + " |")
    print("| --- " * (len(names) + 1) + "|")
    for (out, cols, bits, group), times in rows:
        cells = [f"{times[n]:.3f}" if n in times else "-" for n in names]
        print(f"| {out} x {cols}, {bits}, {group} | " + " | ".join(cells) + " |")
    if args.profile:
        profile(args.profile, args.tokens, args.prompt)


if __name__ == "__main__":
    main()
