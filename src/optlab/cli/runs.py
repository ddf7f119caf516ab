"""Commands over runs: ``optlab run RECIPE`` runs steps into one directory, ``optlab rerun
RUN`` replays a run from its config.yaml."""

from __future__ import annotations

import argparse
import time
from typing import Any

from optlab.cli.generate import add_clean_stale, clean_stale_beside


def add_commands(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run", help="run a recipe: several commands in a row, one report",
        description="Run the steps of RECIPE (a YAML file, or a shipped recipe by name:\n"
        "quickstart, prune-retrain-quantize) into --out: each step is a command with its\n"
        "settings (as a run's config.yaml holds them) and writes OUT/<step>; a step's model\n"
        "may name an earlier step. report.md and report.html (plots embedded) compare them.\n"
        "example: optlab run recipes/quickstart.yaml --out runs/quickstart",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    run.add_argument("recipe", metavar="RECIPE", help="a recipe .yaml file or a shipped name")
    run.add_argument("--out", required=True, help="directory for the steps' runs and reports")
    _recipe_options(run)
    run.set_defaults(handler=cmd_run)

    demo = commands.add_parser(
        "demo", help="the quickstart recipe on the default model",
        description="Run the shipped quickstart recipe (recipes/quickstart.yaml): evaluate the\n"
        "default model (perplexity, sentiment accuracy, two completions), prune it 50% with\n"
        "Wanda and evaluate it again, quantize a fresh copy to 4.5 bits on average by TDMPQ\n"
        "sensitivity and evaluate that; report.md and report.html compare the steps.\n"
        "Same as: optlab run quickstart --out DIR",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    demo.add_argument("--out", default=time.strftime("runs/demo-%Y%m%d-%H%M%S"),
                      help="directory to write (default runs/demo-<time>)")  # fmt: skip
    demo.add_argument("--limit", type=_positive, help="perplexity windows per evaluation (20)")
    _recipe_options(demo)
    demo.set_defaults(handler=cmd_demo)

    rerun = commands.add_parser(
        "rerun", help="replay a run from its config.yaml",
        description="Run the command that made RUN again, with the same configs, data specs\n"
        "and seed (its config.yaml), and write the new run to --out.\n"
        "example: optlab rerun runs/w50 --out runs/w50-again",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    rerun.add_argument("run", metavar="RUN", help="a run directory written by optlab")
    rerun.add_argument("--out", required=True, help="run directory to write")
    rerun.add_argument("--force", action="store_true", help="replace an existing run at --out")
    rerun.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    add_clean_stale(rerun)
    rerun.set_defaults(handler=cmd_rerun)


def _recipe_options(parser: argparse.ArgumentParser) -> None:
    """The flags of the two commands that run a recipe (``run`` and ``demo``)."""
    parser.add_argument("--resume", action="store_true",
                        help="skip finished steps whose settings are unchanged")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="run every step of --out again")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    add_clean_stale(parser)


def cmd_rerun(args: argparse.Namespace) -> dict[str, Any]:
    from optlab.api import rerun

    if args.clean_stale:
        clean_stale_beside(args.out)
    return rerun(args.run, out=args.out, force=args.force).to_dict()


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    from optlab.recipe import run_recipe

    if args.clean_stale:
        clean_stale_beside(args.out, inside=True)  # the steps stage inside --out
    result = run_recipe(args.recipe, args.out, resume=args.resume, force=args.force)
    return _recipe_summary(result)


def _recipe_summary(result: dict[str, Any]) -> dict[str, Any]:
    steps = {name: step["run"] for name, step in result["steps"].items()}
    return {"steps": steps, "seconds": result["seconds"], "run": result["run"],
            "report": result["report"]}  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from optlab.recipe import quickstart

    if args.clean_stale:
        clean_stale_beside(args.out, inside=True)  # the steps stage inside --out
    result = quickstart(args.out, limit=args.limit, resume=args.resume, force=args.force)
    return _recipe_summary(result)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value
