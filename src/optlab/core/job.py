"""Jobs and commands: one description of a unit of work for the CLI, ``rerun`` and recipes.

A :class:`Job` is everything a command needs: its inputs (a model spec, a run directory),
its config sections (a method config, the calibration data, the evaluation) and the seed,
device and dtype. A run's ``config.yaml`` *is* its job (``Job.to_dict``), so ``rerun``
rebuilds the job from it and runs it again. A :class:`Command` declares its inputs and
sections once; the CLI's flags are generated from them and from the config fields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optlab.core import hooks
from optlab.core.config import METHODS, Registry, config_from_dict, config_to_dict
from optlab.core.run import check_target, read_run_config
from optlab.errors import OptlabError


@dataclass
class Result(Mapping[str, Any]):
    """What a command returns: its metrics and, when it wrote one, its run directory. Reads
    like the metrics dict (``result["perplexity"]``); ``to_dict()`` adds ``run``."""

    metrics: dict[str, Any]
    run: Path | None = None

    def __getitem__(self, key: str) -> Any:
        if key == "run" and self.run is not None:
            return str(self.run)
        return self.metrics[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.metrics
        if self.run is not None and "run" not in self.metrics:
            yield "run"

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def to_dict(self) -> dict[str, Any]:
        return {key: self[key] for key in self}


@dataclass(frozen=True)
class Input:
    """A positional input of a command: a model spec, a run directory, a file."""

    name: str
    metavar: str
    help: str


@dataclass(frozen=True)
class Section:
    """A config section of a command: ``config.yaml``'s key ``name`` and the Python API's
    keyword. ``default`` is the config the command starts from (its class gives the flags).
    With ``family``, the section holds any method config registered under that name: the
    ``selector`` flag picks it (``shortcuts``: extra flags that pick one method), or, with
    ``by_flags``, the flag of a method's first field does (``--avg-bits 4.5``); a ``None``
    default makes the choice required. A section of one config class that has no valid
    default (unlearn's data: a scenario or a forget file) names it in ``config`` with a
    ``None`` default: its flags then build it from the class, which validates them."""

    name: str
    default: Any
    title: str
    family: str | None = None
    selector: str = "--method"
    shortcuts: tuple[tuple[str, str, str], ...] = ()  # (flag, method, help)
    by_flags: bool = False
    config: type | None = None

    @property
    def config_class(self) -> type:
        """The config class of a section without a family."""
        return self.config if self.default is None and self.config else type(self.default)


@dataclass(frozen=True)
class Command:
    """A named unit of work: inputs, config sections, and the function that runs a job.

    ``out`` is whether ``--out`` is ``required``, ``optional`` or ``none`` (a run
    directory), or ``file`` (a single file the command writes).
    """

    name: str
    help: str
    description: str
    inputs: tuple[Input, ...]
    sections: tuple[Section, ...]
    run: Callable[..., Result]  # run(job, out=..., force=..., progress=...)
    out: str = "required"
    seed: int = 0
    examples: tuple[str, ...] = ()


COMMANDS: Registry[Command] = Registry("command")
GIVEN = "given_in_python"  # config.yaml's record of data passed as tensors: not replayable


def register_command(command: Command) -> Command:
    COMMANDS.register(command.name)(command)
    return command


def get_command(name: str) -> Command:
    """A registered command; the packages that register commands are imported first."""
    hooks.import_plugins(hooks.COMMANDS)
    return COMMANDS.get(name)


@dataclass(frozen=True)
class Job:
    """One command's complete, replayable description (what ``config.yaml`` holds)."""

    command: str
    inputs: dict[str, Any]
    configs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    model_seed: int | None = None  # the seed the model was loaded with, when not ``seed``

    def to_dict(self) -> dict[str, Any]:
        sections = {k: config_to_dict(v) if v is not None and hasattr(type(v), "TYPE") else v
                    for k, v in self.configs.items()}  # fmt: skip
        loading = {} if self.model_seed is None else {"model_seed": self.model_seed}
        return {"command": self.command, **self.inputs, "seed": self.seed, **loading,
                "device": self.device, "dtype": self.dtype, **sections}  # fmt: skip

    @property
    def load_seed(self) -> int:
        return self.seed if self.model_seed is None else self.model_seed

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> Job:
        """Rebuild a job; sections may be partial (a recipe step's), the rest from defaults."""
        if not isinstance(data, Mapping) or "command" not in data:
            raise OptlabError(f"{source} names no command (a 'command:' key)")
        command = get_command(str(data["command"]))
        inputs = {i.name: data.get(i.name) for i in command.inputs}
        missing = [i.metavar for i in command.inputs if inputs[i.name] is None]
        if missing:
            raise OptlabError(f"{source}: {command.name} needs {', '.join(missing)}")
        configs = {s.name: section_config(s, data.get(s.name, {}), source) for s in
                   command.sections}  # fmt: skip
        known = {"command", "seed", "model_seed", "device", "dtype", *inputs, *configs}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OptlabError(f"{source}: {command.name} has no setting {unknown[0]!r} "
                              f"(it has {', '.join(sorted(known))})")  # fmt: skip
        return cls(command.name, inputs, configs, seed=int(data.get("seed", command.seed)),
                   device=str(data.get("device", "cpu")),
                   dtype=str(data.get("dtype", "float32")),
                   model_seed=data.get("model_seed"))  # fmt: skip


def section_config(section: Section, data: Any, source: str = "config") -> Any:
    """The config of ``section`` from (possibly partial) plain data: ``type`` picks the
    method (a family section) and fields not given keep the section's defaults."""
    if data is None or not isinstance(data, Mapping):
        if data is None:
            return None
        raise OptlabError(f"{source}: {section.name} must be a mapping of settings, got "
                          f"{data!r}")  # fmt: skip
    if GIVEN in data:
        raise OptlabError(f"{source}: its {section.name} data was given in Python (shape "
                          f"{data[GIVEN]}), so the run cannot be replayed")  # fmt: skip
    data = dict(data)
    tag = data.pop("type", None)
    default = section.default
    if default is None and tag is None and section.family is not None:
        choices = ", ".join(METHODS.methods(str(section.family)))
        raise OptlabError(f"{source}: {section.name} needs a type (one of {choices})")
    if section.family is not None:
        cls = METHODS.get(section.family, str(tag)).config if tag else type(default)
    else:
        cls = section.config_class
        if tag is not None and tag != cls.TYPE:  # type: ignore[attr-defined]
            raise OptlabError(f"{source}: {section.name} must be a {cls.TYPE}, not {tag!r}")  # type: ignore[attr-defined]
    base = config_to_dict(default) if type(default) is cls else {"type": cls.TYPE}  # type: ignore[attr-defined]
    return config_from_dict({**base, **data}, cls)  # a version in data is checked there


def run_job(
    job: Job, out: str | Path | None = None, *, force: bool = False, progress: bool = True
) -> Result:
    """Run a job: the output path is checked before anything is loaded."""
    command = get_command(job.command)
    if out is not None and command.out != "file":  # a file output checks its own target
        check_target(out, force)
    elif command.out == "required":
        raise OptlabError(f"{command.name} writes a run: give an output directory (--out)")
    return command.run(job, out=out, force=force, progress=progress)


def load_job(run: str | Path) -> Job:
    """The job a run directory was made by (its ``config.yaml``)."""
    path = Path(run)
    config_file = path / "config.yaml" if path.is_dir() else path
    if not config_file.is_file():
        raise OptlabError(f"{str(path)!r} is not an optlab run (no config.yaml)")
    data = read_run_config(config_file)  # plain YAML only: no Python tags
    if data.get("command") in (None, "demo"):
        raise OptlabError(f"{config_file} was written by an optlab without replayable configs "
                          "(no job in it)")  # fmt: skip
    return Job.from_dict(data, source=str(config_file))
