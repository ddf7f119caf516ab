"""Parity benchmark: optlab's Wanda and SparseGPT beside the official code, same windows.

The official code is not part of optlab: clone https://github.com/locuslab/wanda yourself
(its `lib/prune.py` holds both its Wanda and its SparseGPT) and pass the folder. Both sides
prune the same LLaMA-architecture model on the same calibration windows, optlab's evaluator
scores both, and the table gives the perplexity difference and the pruning-time ratio.

    git clone https://github.com/locuslab/wanda /tmp/wanda
    python benchmarks/parity.py --official /tmp/wanda      # default model: about 30 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import torch
from prune import row
from transformers.models.llama import modeling_llama

from optlab.api import evaluate, prune
from optlab.core.calibration import Calibration
from optlab.core.config import config_from_dict
from optlab.core.data import load_text, sample_windows
from optlab.core.models import LoadedModel, load_model
from optlab.pruning.masks import Pattern


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="a clone of locuslab/wanda")
    parser.add_argument("--model", default="default", help="a LLaMA-architecture model")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-limit", type=int, default=40)
    args = parser.parse_args()

    official = import_official(args.official.resolve())
    lm = load_model(args.model)
    if not isinstance(lm.model, modeling_llama.LlamaForCausalLM):
        sys.exit(f"the official code prunes LLaMA-architecture models; {args.model} is not one")
    windows = sample_windows(lm.tokenizer, load_text("wiki:calib"), args.n_calib, args.seq_len, 0)
    official.get_loaders = lambda *a, **k: ([(w[None], None) for w in windows], None)
    pass_rotary_embeddings(lm.model)

    def perplexity(lm: LoadedModel) -> float:
        r = evaluate(lm, ["ppl:wiki"], seq_len=args.seq_len, limit=args.eval_limit)
        return r["tasks"]["ppl:wiki"]["perplexity"]

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
            official_ppl = perplexity(theirs)

            ours = load_model(args.model)
            start = time.perf_counter()
            config = config_from_dict({"type": method, "pattern": pattern})
            calib = Calibration(n=args.n_calib, seq_len=args.seq_len)
            prune(ours, config, calib=calib, progress=False)
            optlab_s = time.perf_counter() - start
            optlab_ppl = perplexity(ours)
            row(method, pattern, f"{official_ppl:.2f}", f"{optlab_ppl:.2f}",
                f"{100 * (optlab_ppl / official_ppl - 1):+.2f}%", f"{official_s:.1f}",
                f"{optlab_s:.1f}", f"{optlab_s / official_s:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
