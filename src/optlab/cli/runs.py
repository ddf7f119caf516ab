"""Commands over runs themselves: ``optlab rerun RUN`` replays a run from its config.yaml."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(commands: argparse._SubParsersAction) -> None:
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
    rerun.set_defaults(handler=cmd_rerun)


def cmd_rerun(args: argparse.Namespace) -> dict[str, Any]:
    from optlab.api import rerun

    return rerun(args.run, out=args.out, force=args.force).to_dict()
