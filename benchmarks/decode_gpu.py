"""GPU check of the packed decode: QuantLinear's int4 tinygemm path on CUDA, as one short run.

1. Kernels: 4-bit layers of decoding shapes (groups of 64) select ``tinygemm``; its output
   matches the dequantized product within bf16 rounding; time of one-row and 256-row forwards
   against the dequantizing path and fp16 ``F.linear``.
2. Decoding: a packed tiny:llama (every block linear at 4 bits) decodes greedily on the GPU,
   eagerly and compiled (Triton), and the tokens are compared with the dequantizing path's.
3. With ``--model`` (e.g. default, when its GGUF package is installed there): the decode
   benchmark (`benchmarks/decode.py --device cuda`) on that model.

    python benchmarks/decode_gpu.py                 # ~2 minutes on one GPU
    python benchmarks/decode_gpu.py --model default
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from optlab.core.anatomy import Anatomy
from optlab.core.decode import greedy
from optlab.core.models import load_model
from optlab.quant.apply import quantize_rtn_model
from optlab.quant.linear import QuantLinear
from optlab.quant.quantizer import quantize_rtn


def timed(run, repeats: int = 50) -> float:
    """Mean milliseconds of ``run`` after a warm-up, synchronised."""
    run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def check_kernels() -> None:
    for out, cols in ((1536, 576), (576, 1536), (49152, 576)):
        weight = torch.randn(out, cols, device="cuda") * 0.02
        qw = quantize_rtn(weight, 4, 64)
        layer = QuantLinear.from_quantized(qw)
        assert layer.kernel_name() == "tinygemm", layer.kernel_name()
        reference_weight = qw.dequantize()
        for rows in (1, 256):
            x = torch.randn(rows, cols, device="cuda")
            got, expected = layer(x), x @ reference_weight.T
            error = ((got - expected).norm() / expected.norm()).item()
            fast = timed(lambda x=x, layer=layer: layer(x))
            layer.kernel = "dequant"
            slow = timed(lambda x=x, layer=layer: layer(x))
            layer.kernel = "auto"
            half = reference_weight.half()
            dense = timed(lambda x=x, half=half: F.linear(x.half(), half))
            print(f"{out}x{cols}, {rows} rows: tinygemm {fast:.3f} ms, dequant {slow:.3f} ms, "
                  f"fp16 F.linear {dense:.3f} ms; relative error {error:.1e}")  # fmt: skip
            assert error < 2e-2, "tinygemm disagrees with the dequantized weight"


def check_decoding() -> None:
    lm = load_model("tiny:llama")
    anatomy = Anatomy.of(lm.model)
    names = {f"{anatomy.blocks_path}.{i}.{n}": 4 for i, block in enumerate(anatomy.blocks)
             for n in anatomy.linears(block)}  # fmt: skip
    quantize_rtn_model(lm.model, names, 32)
    lm.model.to("cuda")
    kernels = {m.kernel_name() for m in lm.model.modules() if isinstance(m, QuantLinear)}
    prompt = lm.tokenizer("def f(x):", add_special_tokens=False).input_ids
    eager = greedy(lm.model, [prompt], 16, eos=())[0]
    start = time.perf_counter()
    compiled = greedy(lm.model, [prompt], 16, eos=(), compile=True)[0]
    compile_s = time.perf_counter() - start
    for module in lm.model.modules():
        if isinstance(module, QuantLinear):
            module.kernel = "dequant"
    reference = greedy(lm.model, [prompt], 16, eos=())[0]
    agree = sum(a == b for a, b in zip(eager, reference, strict=True))
    print(f"tiny:llama packed on cuda, kernels {sorted(kernels)}: eager tinygemm tokens agree "
          f"with dequant on {agree}/16; compiled equals eager: {compiled == eager} "
          f"(first compiled call {compile_s:.0f} s)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="also run benchmarks/decode.py --device cuda on it")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a GPU machine")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    check_kernels()
    check_decoding()
    if args.model:
        script = Path(__file__).with_name("decode.py")
        subprocess.run([sys.executable, str(script), "--model", args.model, "--device", "cuda",
                        "--threads", "4"], check=True)  # fmt: skip


if __name__ == "__main__":
    main()
