"""Parity benchmark: optlab's Wanda, SparseGPT and GPTQ beside the official code, same windows.

The official code is not part of optlab: clone it yourself and pass the folder.
`--official` is a clone of https://github.com/locuslab/wanda (its `lib/prune.py` holds both
its Wanda and its SparseGPT); `--gptq-repo` a clone of https://github.com/IST-DASLab/gptq
(`gptq.py`, `quant.py`, `llama.py`). Both sides compress the same LLaMA-architecture model on
the same calibration windows, optlab's evaluator scores both, and the tables give the
perplexity difference and the time ratio. For GPTQ a first table compares the layer error
||W X - W_hat X||^2 of RTN, optlab and the official code on one real block's inputs.

    git clone https://github.com/locuslab/wanda /tmp/wanda
    python benchmarks/parity.py --official /tmp/wanda      # default model: about 30 min on 2 cores
    git clone https://github.com/IST-DASLab/gptq /tmp/gptq
    python benchmarks/parity.py --gptq-repo /tmp/gptq --n-calib 16 --bits 4,3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import sys
import time
import types
from pathlib import Path

import torch
from prune import row
from transformers.models.llama import modeling_llama

from optlab.api import GPTQConfig, RTNConfig, StorageConfig, UniformConfig, evaluate, prune
from optlab.api import quantize as optlab_quantize
from optlab.core.anatomy import Anatomy
from optlab.core.calibration import Calibration
from optlab.core.config import config_from_dict
from optlab.core.data import load_text, sample_windows
from optlab.core.layerwise import BlockContext, batched, run_layerwise
from optlab.core.models import LoadedModel, load_model
from optlab.core.stats import Hessian, record_inputs
from optlab.pruning.masks import Pattern
from optlab.quant.gptq import gptq_quantize
from optlab.quant.quantizer import quantize_rtn


def import_official(folder: Path) -> types.ModuleType:
    """Import the official `lib.prune`, with the stand-ins it needs to run here on a CPU."""
    if not (folder / "lib" / "prune.py").is_file():
        sys.exit(f"{folder} is not a clone of locuslab/wanda (no lib/prune.py)")
    sys.path.insert(0, str(folder))
    # Only its C4 loader uses `datasets`, and we hand it our own windows instead.
    sys.modules.setdefault("datasets", types.SimpleNamespace(load_dataset=None))
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # it synchronises after every block
    import lib.prune as official

    return official


def pass_rotary_embeddings(model: torch.nn.Module) -> None:
    """transformers 5 decoder layers take the rotary embeddings as an argument; the official
    input catcher keeps only the mask and the position ids, so compute them from those."""
    rotary, forward = model.model.rotary_emb, modeling_llama.LlamaDecoderLayer.forward

    def with_rotary(self, hidden, *args, position_embeddings=None, position_ids=None, **kw):
        if position_embeddings is None:
            if position_ids is None:
                position_ids = torch.arange(hidden.shape[1])[None]
            position_embeddings = rotary(hidden, position_ids)
        return forward(self, hidden, *args, position_embeddings=position_embeddings,
                       position_ids=position_ids, **kw)  # fmt: skip

    modeling_llama.LlamaDecoderLayer.forward = with_rotary


def import_official_gptq(folder: Path) -> types.ModuleType:
    """Import the official `llama` module (and through it `gptq`, `quant`) to run on a CPU."""
    if not all((folder / f).is_file() for f in ("gptq.py", "quant.py", "llama.py")):
        sys.exit(f"{folder} is not a clone of IST-DASLab/gptq (no gptq.py, quant.py, llama.py)")
    sys.path.insert(0, str(folder))
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # called after every layer
    with contextlib.redirect_stdout(io.StringIO()):  # "CUDA extension not installed."
        import llama as official

    return official


def official_settings(n_calib: int, bits: int, group: int, order: str) -> types.SimpleNamespace:
    """The official command line's flags, as its `llama_sequential` reads them."""
    return types.SimpleNamespace(
        nsamples=n_calib, wbits=bits, groupsize=group or -1, sym=False, percdamp=0.01,
        act_order=order != "plain", static_groups=order == "act" and group > 0,
        true_sequential=False,
    )  # fmt: skip


class _Inputs:
    """Keeps every input batch of a linear (for the exact layer error)."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def add_batch(self, x: torch.Tensor) -> None:
        self.batches.append(x.reshape(-1, x.shape[-1]).clone())


def block_inputs(lm: LoadedModel, windows: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
    """The inputs X [tokens, in] of every linear of block ``index`` of the unedited model."""
    linears = Anatomy.of(lm.model).linears(lm.model.model.layers[index])
    stats = {name: _Inputs() for name in linears}

    def on_block(ctx: BlockContext) -> None:
        if ctx.index == index:
            with record_inputs(linears, stats):
                ctx.run()
            raise StopIteration

    with contextlib.suppress(StopIteration):
        run_layerwise(lm.model, batched(windows, 8), on_block, progress=False)
    return {name: torch.cat(stats[name].batches) for name in linears}


def gptq_layer_check(official: types.ModuleType, lm: LoadedModel, windows: torch.Tensor,
                     args: argparse.Namespace) -> None:  # fmt: skip
    """One real block: ||W X - W_hat X||^2 / ||W X||^2 of RTN, optlab and the official GPTQ."""
    inputs = block_inputs(lm, windows, args.layer)
    print(f"layer error ||W X - W_hat X||^2 / ||W X||^2 (x 1e-3) on block {args.layer}'s "
          f"{next(iter(inputs.values())).shape[0]} calibration tokens\n")  # fmt: skip
    row("linear", "bits", "group", "order", "RTN", "official", "optlab", "difference")
    row(*["---"] * 8)
    block = lm.model.model.layers[args.layer]
    for name, x in inputs.items():
        module = block.get_submodule(name)
        weight = module.weight.detach().float()
        hessian = Hessian(weight.shape[1])
        hessian.add_batch(x)
        exact = x.double() @ weight.double().T

        def error(w_hat: torch.Tensor, exact: torch.Tensor = exact, x: torch.Tensor = x) -> float:
            return float((x.double() @ w_hat.double().T - exact).square().sum()
                         / exact.square().sum() * 1e3)  # fmt: skip

        for bits, group, order in _grid(args):
            rtn = error(quantize_rtn(weight, bits, group).dequantize())
            theirs = error(official_layer(official, module, x, bits, group, order))
            cells = ["-", "-"]
            if order != "act-dynamic":
                ours = error(gptq_quantize(weight, hessian.matrix, bits, group,
                                           act_order=order == "act").dequantize())  # fmt: skip
                cells = [f"{ours:.3f}", f"{100 * (ours / theirs - 1):+.2f}%"]
            row(name, bits, group or "channel", order, f"{rtn:.3f}", f"{theirs:.3f}", *cells)


def official_layer(official: types.ModuleType, module: torch.nn.Module, x: torch.Tensor,
                   bits: int, group: int, order: str) -> torch.Tensor:  # fmt: skip
    """The official GPTQ's quantized weight of a copy of ``module`` given its inputs ``x``."""
    layer = torch.nn.Linear(module.in_features, module.out_features, bias=False)
    layer.weight.data = module.weight.detach().float().clone()
    gptq = official.GPTQ(layer)
    gptq.add_batch(x[None], None)
    gptq.quantizer = official.Quantizer()
    gptq.quantizer.configure(bits, perchannel=True, sym=False, mse=False)
    flags = official_settings(0, bits, group, order)
    with contextlib.redirect_stdout(io.StringIO()):
        gptq.fasterquant(percdamp=flags.percdamp, groupsize=flags.groupsize,
                         actorder=flags.act_order, static_groups=flags.static_groups)  # fmt: skip
    return layer.weight.detach()


def _grid(args: argparse.Namespace) -> list[tuple[int, int, str]]:
    """(bits, group, order) to compare; "act-dynamic" (official act-order with groups fitted
    in the permuted order, so not contiguous) has no packed form here: official only."""
    grid = itertools.product(args.bits.split(","), args.group_sizes.split(","),
                             args.orders.split(","))  # fmt: skip
    return [(int(b), int(g), o) for b, g, o in grid if not (o == "act-dynamic" and int(g) == 0)]


def model_and_windows(args: argparse.Namespace, verb: str) -> tuple[LoadedModel, torch.Tensor]:
    """The LLaMA-architecture model both sides start from and the calibration windows."""
    lm = load_model(args.model)
    if not isinstance(lm.model, modeling_llama.LlamaForCausalLM):
        sys.exit(f"the official code {verb} LLaMA-architecture models; {args.model} is not one")
    windows = sample_windows(lm.tokenizer, load_text("wiki:calib"), args.n_calib, args.seq_len, 0)
    pass_rotary_embeddings(lm.model)
    return lm, windows


def perplexity(lm: LoadedModel, args: argparse.Namespace) -> float:
    r = evaluate(lm, ["ppl:wiki"], seq_len=args.seq_len, limit=args.eval_limit, progress=False)
    return r["tasks"]["ppl:wiki"]["perplexity"]


def gptq_parity(folder: Path, args: argparse.Namespace) -> None:
    official = import_official_gptq(folder)
    lm, windows = model_and_windows(args, "quantizes")
    header = (f"model {args.model}; calibration {args.n_calib} x {args.seq_len} tokens of "
              f"wiki:calib; evaluation: first {args.eval_limit} windows of {args.seq_len} "
              "tokens of wiki:eval; asymmetric grids, damping 0.01, blocks of 128")  # fmt: skip
    print(header + "\n")
    if args.layer >= 0:
        gptq_layer_check(official, lm, windows, args)
        print()
    if args.layer_only:
        return

    def ours(bits: int, group: int, quantizer: GPTQConfig | RTNConfig) -> tuple[float, float]:
        lm = load_model(args.model)
        start = time.perf_counter()
        # fp32 outside the packed linears, as the official code leaves them
        optlab_quantize(lm, UniformConfig(uniform=bits), quantizer=quantizer, calib=windows,
                        storage=StorageConfig(rest_dtype="model"), progress=False)  # fmt: skip
        return perplexity(lm, args), time.perf_counter() - start

    row("bits", "group", "order", "RTN", "official", "optlab", "difference", "official s",
        "optlab s")  # fmt: skip
    row(*["---"] * 9)
    rtn: dict[tuple[int, int], float] = {}
    for bits, group, order in _grid(args):
        if (bits, group) not in rtn:
            rtn[bits, group] = ours(bits, group, RTNConfig(group_size=group))[0]
        theirs = load_model(args.model)
        theirs.model.seqlen = args.seq_len
        official.args = official_settings(args.n_calib, bits, group, order)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every linear's error
            official.llama_sequential(theirs.model, [(w[None], None) for w in windows],
                                      torch.device("cpu"))  # fmt: skip
        official_s = time.perf_counter() - start
        official_ppl = perplexity(theirs, args)
        cells = ["-", "-", "-"]
        if order != "act-dynamic":
            config = GPTQConfig(group_size=group, act_order=order == "act")
            optlab_ppl, optlab_s = ours(bits, group, config)
            cells = [f"{optlab_ppl:.2f}", f"{100 * (optlab_ppl / official_ppl - 1):+.2f}%",
                     f"{optlab_s:.1f}"]  # fmt: skip
        row(
            bits,
            group or "channel",
            order,
            f"{rtn[bits, group]:.2f}",
            f"{official_ppl:.2f}",
            cells[0],
            cells[1],
            f"{official_s:.1f}",
            cells[2],
        )


def pruning_parity(folder: Path, args: argparse.Namespace) -> None:
    official = import_official(folder)
    _, windows = model_and_windows(args, "prunes")
    official.get_loaders = lambda *a, **k: ([(w[None], None) for w in windows], None)

    print(
        f"model {args.model}; calibration {args.n_calib} x {args.seq_len} tokens of wiki:calib; "
        f"evaluation: first {args.eval_limit} windows of {args.seq_len} tokens of wiki:eval\n"
    )
    row("method", "pattern", "official perplexity", "optlab perplexity", "difference",
        "official s", "optlab s", "time ratio")  # fmt: skip
    row(*["---"] * 8)
    for pattern in args.patterns.split(","):
        shape = Pattern.parse(pattern, None)  # N:M fixes the sparsity; unstructured is 50%
        settings = types.SimpleNamespace(
            nsamples=args.n_calib, seed=0, sparsity_ratio=shape.sparsity, use_variant=False
        )
        for method in args.methods.split(","):
            theirs = load_model(args.model)
            theirs.model.seqlen, theirs.model.hf_device_map = args.seq_len, {}
            start = time.perf_counter()
            getattr(official, f"prune_{method}")(
                settings, theirs.model, theirs.tokenizer, torch.device("cpu"),
                prune_n=shape.n, prune_m=shape.m,
            )  # fmt: skip
            official_s = time.perf_counter() - start
            official_ppl = perplexity(theirs, args)

            ours = load_model(args.model)
            start = time.perf_counter()
            config = config_from_dict({"type": method, "pattern": pattern})
            calib = Calibration(n=args.n_calib, seq_len=args.seq_len)
            prune(ours, config, calib=calib, progress=False)
            optlab_s = time.perf_counter() - start
            optlab_ppl = perplexity(ours, args)
            row(method, pattern, f"{official_ppl:.2f}", f"{optlab_ppl:.2f}",
                f"{100 * (optlab_ppl / official_ppl - 1):+.2f}%", f"{official_s:.1f}",
                f"{optlab_s:.1f}", f"{optlab_s / official_s:.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, help="a clone of locuslab/wanda")
    parser.add_argument("--gptq-repo", type=Path, help="a clone of IST-DASLab/gptq")
    parser.add_argument("--model", default="default", help="a LLaMA-architecture model")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--bits", default="4,3", help="GPTQ widths")
    parser.add_argument("--group-sizes", default="128,0", help="GPTQ groups; 0 = per channel")
    parser.add_argument(
        "--orders",
        default="plain,act",
        help="plain, act (act-order; with groups, static groups) and "
        "act-dynamic (official only, its groups in the permuted order)",
    )
    parser.add_argument(
        "--layer", type=int, default=3, help="block of the GPTQ layer-error table; -1 = skip it"
    )
    parser.add_argument("--layer-only", action="store_true", help="GPTQ: no perplexity table")
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=40)
    args = parser.parse_args()
    if args.official is None and args.gptq_repo is None:
        parser.error("pass --official (Wanda, SparseGPT) and/or --gptq-repo (GPTQ)")
    if args.official is not None:
        pruning_parity(args.official.resolve(), args)
    if args.gptq_repo is not None:
        gptq_parity(args.gptq_repo.resolve(), args)


if __name__ == "__main__":
    main()
