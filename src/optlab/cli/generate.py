"""CLI flags generated from a command's sections and its configs' fields.

Each config field becomes one flag (``--field-name``, or the field's ``flag``), with the help
text and default of the dataclass, so a default is written once. A family section adds
``--method``; a flag that belongs to another method than the chosen one is refused. Flags
not given stay out of the namespace (``SUPPRESS``), so the config's own defaults apply.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optlab.core.config import METHODS
from optlab.core.job import Command, Job, Section
from optlab.core.run import clean_stale_partials
from optlab.errors import OptlabError

log = logging.getLogger("optlab")

COMMON_DESTS = ("seed", "device", "dtype")


@dataclasses.dataclass(frozen=True)
class _Flag:
    section: Section
    field: dataclasses.Field
    owners: tuple[str, ...]  # the methods whose config has this field (family sections)

    @property
    def dest(self) -> str:
        return f"{self.section.name}:{self.field.name}"


def section_flags(section: Section) -> list[_Flag]:
    """One flag per field name across the section's config classes, in declaration order."""
    classes = _classes(section)
    owners: dict[str, list[str]] = {}
    fields: dict[str, dataclasses.Field] = {}
    for name, cls in classes.items():
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True):
                fields.setdefault(f.name, f)
                owners.setdefault(f.name, []).append(name)
    return [_Flag(section, f, tuple(owners[f.name])) for f in fields.values()]


def _classes(section: Section) -> dict[str, type]:
    if section.family is None:
        return {section.config_class.TYPE: section.config_class}  # type: ignore[attr-defined]
    return {name: m.config for name, m in METHODS.methods(section.family).items()}


def _flag_name(f: dataclasses.Field) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    prefix = "--no-" if f.default is True else "--"
    return prefix + f.name.replace("_", "-")


def _converter(hint: Any, flag: str) -> Callable[[str], Any]:
    """The argparse ``type`` for a field's annotation (``X | None`` converts as ``X``)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType | typing._UnionGenericAlias) and len(args) == 1:  # type: ignore[attr-defined]
        hint = args[0]
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = _converter(typing.get_args(hint)[0], flag)
        return lambda text: tuple(item(p.strip()) for p in text.split(",") if p.strip())
    if hint is int:
        return _number(int, "a whole number")
    if hint is float:
        return _number(float, "a number")
    return str


def _number(kind: type, what: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    return convert


def _shown_default(section: Section, flag: _Flag) -> Any:
    default = section.default
    if default is not None and flag.field.name in {f.name for f in dataclasses.fields(default)}:
        return getattr(default, flag.field.name)
    return flag.field.default


def add_command(
    subparsers: argparse._SubParsersAction,
    command: Command,
    epilog: str | None,
    name: str | None = None,
) -> argparse.ArgumentParser:
    """The subparser of ``command``, with ``_command`` set so main() knows what to run. It is
    called ``name`` (by default the command's last word: ``skeb`` under ``audit``); a
    subparser named by both words (``unlearn sweep``) is reached through
    :class:`optlab.cli.Parser`, which joins the command line's two words."""
    name = name or command.name.split()[-1]
    description = command.description
    for section in command.sections:
        if section.family is not None:
            methods = METHODS.methods(section.family)
            width = max(map(len, methods)) + 3
            how = "by its flag" if section.by_flags else section.selector
            description += f"\n{section.title} ({how}):\n" + "\n".join(
                f"  {n:<{width}}{m.summary}" for n, m in methods.items())  # fmt: skip
    if command.examples:
        description += "\n" + "\n".join(f"example: {e}" for e in command.examples)
    parser = subparsers.add_parser(
        name, help=command.help, description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    for item in command.inputs:
        parser.add_argument(item.name, metavar=item.metavar, help=item.help)
    for section in command.sections:
        group = parser.add_argument_group(section.title)
        if section.family is not None and not section.by_flags:
            names = ", ".join(METHODS.methods(section.family))
            metavar = section.selector.removeprefix("--").upper()
            group.add_argument(section.selector, dest=_choice_dest(section), metavar=metavar,
                               default=argparse.SUPPRESS,
                               help=f"{names} (default {section.default.TYPE})")  # fmt: skip
            for flag, method, help_text in section.shortcuts:
                group.add_argument(flag, dest=_choice_dest(section), action="store_const",
                                   const=method, default=argparse.SUPPRESS,
                                   help=help_text)  # fmt: skip
        hints = {}
        for cls in _classes(section).values():
            hints |= typing.get_type_hints(cls)
        for flag in section_flags(section):
            _add_flag(group, section, flag, hints[flag.field.name], len(_classes(section)))
    common = parser.add_argument_group("common options")
    if command.out != "none":
        what = {"required": "run directory to write", "optional": "also write a run "
                "directory here", "file": "file to write"}[command.out]  # fmt: skip
        common.add_argument("--out", required=command.out in ("required", "file"), help=what)
        common.add_argument("--force", action="store_true",
                            help="replace an existing --out of optlab's")  # fmt: skip
        if command.out != "file":  # a file output is written beside, not staged in a folder
            add_clean_stale(common)
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    common.add_argument("--seed", type=_number(int, "a whole number"), default=command.seed,
                        help=f"random seed (default {command.seed})")  # fmt: skip
    common.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    common.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights and compute dtype (default float32)")  # fmt: skip
    parser.set_defaults(_command=command)
    return parser


def add_clean_stale(group: argparse._ActionsContainer) -> None:
    """The ``--clean-stale`` flag (see :func:`clean_stale_beside`)."""
    group.add_argument("--clean-stale", action="store_true",
                       help="first remove staging folders (.NAME.partial-PID-*) that runs "
                       "killed before they could clean up left beside --out")  # fmt: skip


def clean_stale_beside(out: str | Path | None, *, inside: bool = False) -> list[Path]:
    """``--clean-stale``: remove the staging folders of dead runs beside ``out`` (and in it,
    with ``inside``: a recipe's steps stage there), logging each; a folder whose process is
    alive is never touched (:func:`optlab.core.run.stale_partials`)."""
    if out is None:
        return []
    folders = [Path(out).parent, *([Path(out)] if inside else [])]
    removed = [path for folder in folders for path in clean_stale_partials(folder)]
    for path in removed:
        log.info("removed %s: the staging folder of a run that died", path)
    if not removed:
        log.info("no stale staging folders beside %s", out)
    return removed


def _add_flag(
    group: argparse._ArgumentGroup, section: Section, flag: _Flag, hint: Any, methods: int
) -> None:
    f, name = flag.field, _flag_name(flag.field)
    help_text = f.metadata.get("help", "").replace("%", "%%")  # plain text, not a % format
    default = _shown_default(section, flag)
    if methods > 1 and len(flag.owners) < methods:
        help_text = f"[{', '.join(flag.owners)}] {help_text}"
    if isinstance(f.default, bool):
        group.add_argument(name, dest=flag.dest, action="store_const", const=not f.default,
                           default=argparse.SUPPRESS, help=help_text)  # fmt: skip
        return
    if default not in (None, ()) and "default" not in help_text:
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text += f" (default {shown})"
    group.add_argument(
        name, dest=flag.dest, type=_converter(hint, name), default=argparse.SUPPRESS,
        choices=f.metadata.get("choices"),
        metavar=None if f.metadata.get("choices") else f.metadata.get("metavar") or f.name.upper(),
        help=help_text,
    )  # fmt: skip


def _choice_dest(section: Section) -> str:
    return f"{section.name}::method"


def _chosen(section: Section, given: dict[str, Any]) -> type:
    """The config class the flags pick for a section."""
    if section.family is None:
        return section.config_class
    if not section.by_flags:
        name = given.get(_choice_dest(section))
        return type(section.default) if name is None else METHODS.get(section.family, name).config
    classes = _classes(section)
    keys = {name: dataclasses.fields(cls)[0] for name, cls in classes.items()}
    picked = [n for n, f in keys.items() if f"{section.name}:{f.name}" in given]
    if len(picked) == 1:
        return classes[picked[0]]
    if not picked and section.default is not None:
        return type(section.default)
    flags = ", ".join(_flag_name(f) for f in keys.values())
    raise OptlabError(f"give exactly one of {flags}")


def job_from_args(command: Command, args: argparse.Namespace) -> Job:
    """The job the parsed flags describe; each section's config validates itself."""
    given = vars(args)
    configs = {}
    for section in command.sections:
        cls = _chosen(section, given)
        own = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for flag in section_flags(section):
            if flag.dest not in given:
                continue
            if flag.field.name not in own:
                raise OptlabError(f"{_flag_name(flag.field)} is an option of "
                                  f"{' and '.join(flag.owners)}, not of {cls.TYPE}")  # fmt: skip
            values[flag.field.name] = given[flag.dest]
        if "seed" in own:  # a config's seed is the command's --seed
            values["seed"] = given["seed"]
        same = type(section.default) is cls  # else the class's own defaults fill the rest
        configs[section.name] = dataclasses.replace(section.default, **values) if same \
            else cls(**values)  # fmt: skip
    inputs = {item.name: given[item.name] for item in command.inputs}
    return Job(command.name, inputs, configs, seed=given["seed"], device=given["device"],
               dtype=given["dtype"])  # fmt: skip
