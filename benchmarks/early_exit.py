"""Early-exit decoding benchmark: cached generation with exits, and exact self-speculation.

One process, one model, the same code-completion prompts (the test split of code:stdlib, a
context of 20% of each file, capped, as GREEN-CODE's evaluation cuts them), greedy, batch 1:

1. full-model greedy with our cache vs transformers' own ``generate`` (the reference
   tokens), self-speculative decoding at several draft exits E (tokens/s, draft acceptance,
   outputs checked identical), and transformers' ``generate(..., assistant_early_exit=E)``
   (LayerSkip's self-speculation) at the same E;
2. wall time per sample against mean executed layers for fixed and confidence exits with
   ``--kv copy`` and ``--kv recompute`` (agreement: the share of generated tokens equal to the
   full model's at the same position);
3. quality (against the references and relative to all layers), executed layers, time and
   energy of the policy (``--policy``), confidence and fixed exits: ``optlab exit bench``
   itself (:func:`optlab.exit_bench`), its table printed and its run written to ``--out``.

Each configuration runs once untimed first (warm-up), then on every prompt.

    python benchmarks/early_exit.py                       # default model (SmolLM2-135M)
    python benchmarks/early_exit.py --model runs/exits    # an `optlab exit train` run
    python benchmarks/early_exit.py --parts speed --draft-layers 24 --draft-tokens 2
    python benchmarks/early_exit.py --parts quality --policy runs/policy --out runs/bench
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from optlab.core.anatomy import Anatomy
from optlab.core.models import LoadedModel, load_model
from optlab.early_exit.data import CompletionConfig, code_items, completion_samples
from optlab.early_exit.decode import Generation, generate, speculate
from optlab.early_exit.exits import exits_of
from optlab.early_exit.rules import ExitHead, exit_rule


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def hf_greedy(lm: LoadedModel, ids: list[int], n: int, **extra: object) -> Generation:
    x = torch.tensor([ids], device=lm.device)
    begin = time.perf_counter()
    with torch.no_grad():
        out = lm.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                max_new_tokens=n, **extra)  # fmt: skip
    tokens = out[0, len(ids) :].tolist()
    return Generation(tokens, [], time.perf_counter() - begin)


def measure(prompts: list[list[int]], run: Callable[[list[int]], Generation]) -> list[Generation]:
    run(prompts[0])  # warm-up
    return [run(ids) for ids in prompts]


def totals(outs: list[Generation]) -> dict[str, float]:
    tokens = sum(len(o.tokens) for o in outs)
    seconds = sum(o.seconds for o in outs)
    layers = [layer for o in outs for layer in o.layers]
    drafted, accepted = sum(o.drafted for o in outs), sum(o.accepted for o in outs)
    return {"tokens_per_second": tokens / seconds, "seconds_per_sample": seconds / len(outs),
            "layers": sum(layers) / len(layers) if layers else float("nan"),
            "acceptance": accepted / drafted if drafted else float("nan")}  # fmt: skip


def agreement(outs: list[Generation], reference: list[list[int]]) -> tuple[float, int]:
    """Share of tokens equal to the reference's at the same position; identical samples."""
    same = sum(a == b for o, ref in zip(outs, reference, strict=True)
               for a, b in zip(o.tokens, ref, strict=False))  # fmt: skip
    total = sum(len(ref) for ref in reference)
    return same / total, sum(o.tokens == ref for o, ref in zip(outs, reference, strict=True))


def speed(args: argparse.Namespace, lm: LoadedModel, prompts: list[list[int]]) -> dict:
    n = args.new_tokens
    hf = measure(prompts, lambda ids: hf_greedy(lm, ids, n))
    reference = [o.tokens for o in hf]
    _, exits = exit_rule("none", lm, exits_of(lm), 0.5)
    ours = measure(prompts, lambda ids: generate(lm, ids, exit_rule("none", lm, exits, 0.5)[0],
                                                 exits, max_new_tokens=n))  # fmt: skip
    base = totals(ours)["tokens_per_second"]
    results = {"hf_greedy": totals(hf), "ours_greedy": totals(ours)}
    print(f"\n{len(prompts)} prompts x {n} new tokens, greedy, batch 1; "
          f"draft {args.draft_tokens} tokens per round\n")  # fmt: skip
    row("decoder", "E", "tokens/s", "vs our greedy", "s / sample", "acceptance", "identical")
    row(*["---"] * 7)
    for name, outs in (("transformers generate", hf), ("ours, cache, all layers", ours)):
        t, same = totals(outs), agreement(outs, reference)[1]
        row(name, "-", f"{t['tokens_per_second']:.2f}", f"{t['tokens_per_second'] / base:.2f}x",
            f"{t['seconds_per_sample']:.2f}", "-", f"{same}/{len(prompts)}")  # fmt: skip
    for e in args.draft_layers:
        spec = measure(prompts, lambda ids, e=e: speculate(
            lm, ids, e, draft_tokens=args.draft_tokens, max_new_tokens=n))  # fmt: skip
        layerskip = measure(prompts, lambda ids, e=e: hf_greedy(
            lm, ids, n, assistant_early_exit=e, num_assistant_tokens=args.draft_tokens,
            num_assistant_tokens_schedule="constant"))  # fmt: skip
        for name, outs in (("ours, self-speculative", spec),
                           ("transformers assistant_early_exit", layerskip)):  # fmt: skip
            t = totals(outs)
            results[f"{name} E={e}"] = t
            acc = "-" if name.startswith("transformers") else f"{t['acceptance']:.3f}"
            row(name, e, f"{t['tokens_per_second']:.2f}", f"{t['tokens_per_second'] / base:.2f}x",
                f"{t['seconds_per_sample']:.2f}", acc,
                f"{agreement(outs, reference)[1]}/{len(prompts)}")  # fmt: skip
    return results


def exits_table(args: argparse.Namespace, lm: LoadedModel, prompts: list[list[int]]) -> dict:
    n = args.new_tokens
    num_layers = len(Anatomy.of(lm.model).blocks)
    head = ExitHead(Anatomy.of(lm.model))
    rule, exits = exit_rule("none", lm, exits_of(lm), 0.5)
    full = measure(prompts, lambda ids: generate(lm, ids, rule, exits, max_new_tokens=n))
    reference = [o.tokens for o in full]
    base = totals(full)["seconds_per_sample"]
    print(f"\nexits {','.join(map(str, exits_of(lm)))} (confidence); all layers: "
          f"{base:.2f} s / sample\n")  # fmt: skip
    row("exit", "kv", "mean layers", "layers vs all", "s / sample", "time vs all",
        "token agreement", "identical")  # fmt: skip
    row(*["---"] * 8)
    specs = [f"fixed:{layer}" for layer in args.fixed] + [f"confidence@{t}" for t in args.taus]
    results = {}
    for spec in specs:
        name, _, tau = spec.partition("@")
        rule, exits = exit_rule(name, lm, exits_of(lm), float(tau or 0.5), head=head)
        for kv in ("copy", "recompute"):
            outs = measure(prompts, lambda ids, rule=rule, exits=exits, kv=kv: generate(
                lm, ids, rule, exits, kv=kv, max_new_tokens=n, head=head))  # fmt: skip
            t = totals(outs)
            agree, same = agreement(outs, reference)
            results[f"{spec} {kv}"] = {**t, "agreement": agree, "identical": same}
            row(spec, kv, f"{t['layers']:.2f}", f"{t['layers'] / num_layers:.2f}",
                f"{t['seconds_per_sample']:.2f}", f"{t['seconds_per_sample'] / base:.2f}",
                f"{agree:.3f}", f"{same}/{len(prompts)}")  # fmt: skip
    return results


def quality(args: argparse.Namespace, lm: LoadedModel, prompts: list[list[int]]) -> dict:
    """``exit bench`` on the same model and samples (it cuts the test split alike, seed 0)."""
    from optlab.api import BenchConfig, CompletionConfig, exit_bench
    from optlab.early_exit.bench import results_markdown

    config = BenchConfig(taus=tuple(args.taus), policy=args.policy, fixed=tuple(args.fixed),
                         speculative=tuple(args.draft_layers),
                         draft_tokens=args.draft_tokens)  # fmt: skip
    cut = CompletionConfig(samples=args.samples, max_context=args.max_context,
                           new_tokens=args.new_tokens)  # fmt: skip
    result = exit_bench(lm, config, completion=cut, out=args.out)
    print("\n" + results_markdown(result.metrics))
    return result.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="model spec or exit-train run")
    parser.add_argument("--samples", type=int, default=6, help="prompts (test split files)")
    parser.add_argument("--max-context", type=int, default=192, help="context cap in tokens")
    parser.add_argument("--new-tokens", type=int, default=15)
    parser.add_argument("--draft-layers", type=lambda s: [int(x) for x in s.split(",")],
                        default=[6, 15, 24], help="draft exits E")  # fmt: skip
    parser.add_argument("--draft-tokens", type=int, default=3)
    parser.add_argument("--fixed", type=lambda s: [int(x) for x in s.split(",")],
                        default=[8, 15, 22], help="fixed exit layers")  # fmt: skip
    parser.add_argument("--taus", type=lambda s: [float(x) for x in s.split(",")],
                        default=[0.5, 0.9], help="confidence thresholds")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads (batch 1 on "
                        "shared cores: 1 is fastest)")  # fmt: skip
    parser.add_argument("--parts", default="speed,exits,quality", help="speed (greedy vs "
                        "speculative), exits (fixed / confidence, copy / recompute) and/or "
                        "quality (exit bench: quality, layers, time, energy)")  # fmt: skip
    parser.add_argument("--policy", help="an `optlab exit policy` run (quality part)")
    parser.add_argument("--out", type=Path, help="where the quality part writes its run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    items = code_items("code:stdlib", "test")
    cut = CompletionConfig(samples=args.samples, max_context=args.max_context,
                           new_tokens=args.new_tokens)  # fmt: skip
    samples = completion_samples(items, lm.tokenizer, cut)
    prompts = [s.context_ids.tolist() for s in samples]
    print(f"model {args.model} ({len(Anatomy.of(lm.model).blocks)} layers); {len(prompts)} "
          f"prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens from the test "
          f"split of code:stdlib; torch threads {args.threads}")  # fmt: skip
    parts = {"speed": speed, "exits": exits_table, "quality": quality}
    results = {part: parts[part](args, lm, prompts) for part in args.parts.split(",")}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
