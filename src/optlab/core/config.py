"""Configs: frozen dataclasses, validated once, registered by name, saved with a type tag.

A config is plain data. ``@configurable("wanda")`` registers the class under a name (the
allow-list ``config_from_dict`` rebuilds from, so a ``config.yaml`` can name nothing else) and
stamps it with a version; ``option(...)`` declares a field with the help text the CLI shows,
so each default is written once, in the dataclass. Methods register under a command
(``METHODS.register("prune", WandaConfig)``) and are found by name (did-you-mean on a typo)
or dispatched on the config's type.

>>> @configurable("toy")
... @dataclass(frozen=True)
... class ToyConfig:
...     sparsity: float = option(0.5, "fraction pruned")
>>> config_to_dict(ToyConfig(0.6))
{'type': 'toy', 'version': 1, 'sparsity': 0.6}
>>> config_from_dict({'type': 'toy', 'sparsity': 0.7})
ToyConfig(sparsity=0.7)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from optlab.errors import OptlabError, did_you_mean

T = TypeVar("T")
C = TypeVar("C", bound=type)


class Registry(Generic[T]):
    """Name -> object table; unknown names raise a did-you-mean :class:`OptlabError`.

    >>> tasks = Registry("task")
    >>> @tasks.register("ppl:wiki")
    ... def wiki(): ...
    >>> tasks.get("ppl:wik")  # raises: unknown task 'ppl:wik'. Did you mean 'ppl:wiki'?
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise did_you_mean(self.kind, name, self._items)
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())


# Every config class that a config.yaml may name: the allow-list of config_from_dict.
CONFIG_TYPES: Registry[type] = Registry("config type")


def configurable(name: str, *, version: int = 1) -> Callable[[C], C]:
    """Register a frozen dataclass as config type ``name`` (saved as ``type: name``)."""

    def wrap(cls: C) -> C:
        if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        cls.TYPE = name  # type: ignore[attr-defined]
        cls.VERSION = version  # type: ignore[attr-defined]
        CONFIG_TYPES.register(name)(cls)
        return cls

    return wrap


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    cli: bool = True,
) -> Any:
    """A config field with its CLI help; ``flag`` overrides ``--field-name``, ``cli=False``
    keeps it out of the command line (set from Python or a recipe only)."""
    meta = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "cli": cli}
    if isinstance(default, list | dict | set):
        raise TypeError("config defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=meta)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as plain data with its type tag and version (nested configs tagged too)."""
    data: dict[str, Any] = {}
    if hasattr(type(config), "TYPE"):
        data |= {"type": type(config).TYPE, "version": type(config).VERSION}
    for f in dataclasses.fields(config):
        data[f.name] = _plain(getattr(config, f.name))
    return data


def config_from_dict(data: dict[str, Any], cls: type[T] | None = None) -> T:
    """Rebuild a config from ``config_to_dict``'s output. Only registered types are built
    (``cls`` may name the expected one); unknown fields get a did-you-mean error."""
    if not isinstance(data, dict):
        raise OptlabError(f"a config must be a mapping, got {type(data).__name__}")
    data = dict(data)
    tag, version = data.pop("type", None), data.pop("version", None)
    if tag is not None:
        found = CONFIG_TYPES.get(str(tag))
        if cls is not None and not issubclass(found, cls):
            raise OptlabError(f"config type {tag!r} is not a {cls.__name__}")
        cls = found
    if cls is None:
        raise OptlabError("a config needs a 'type' field naming a registered config")
    newest = getattr(cls, "VERSION", 1)
    if version is not None and (not isinstance(version, int) or not 1 <= version <= newest):
        raise OptlabError(f"{cls.__name__} version {version!r} is not known: this optlab "
                          f"reads versions 1 to {newest}")  # fmt: skip
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise did_you_mean(f"{cls.__name__} field", unknown[0], fields)
    values = {k: _typed(v) for k, v in data.items()}
    return cls(**values)


def _typed(value: Any) -> Any:
    """YAML gives lists where configs hold tuples, and dicts where they hold configs."""
    if isinstance(value, dict) and "type" in value:
        return config_from_dict(value)
    if isinstance(value, list):
        return tuple(value)
    return value


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --- validation helpers: one wording for every config -------------------------------------


def require(condition: bool, message: str) -> None:
    """Raise the user-facing error ``message`` unless ``condition`` holds."""
    if not condition:
        raise OptlabError(message)


def _flag_note(config: Any, name: str) -> str:
    """The flag of a field for an error message, when it is not ``--field-name``: two configs'
    ``lr`` are ``--lr`` and ``--teach-lr``, and the message must say which was bad."""
    fields = {f.name: f for f in dataclasses.fields(config)} if dataclasses.is_dataclass(
        config) else {}  # fmt: skip
    flag = fields[name].metadata.get("flag") if name in fields else None
    return f" (from {flag})" if flag and flag != "--" + name.replace("_", "-") else ""


def require_positive(config: Any, *names: str) -> None:
    """Each named field is a whole number of at least 1."""
    for name in names:
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):  # fmt: skip
            raise OptlabError(f"{name} must be a whole number of at least 1, got {value!r}"
                              + _flag_note(config, name))  # fmt: skip


def require_finite(config: Any, *names: str) -> None:
    """Each named field is a finite number (NaN and infinity would mislead every check)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int | float) or not math.isfinite(value)):
            raise OptlabError(f"{name} must be a finite number, got {value!r}"
                              + _flag_note(config, name))  # fmt: skip


# --- methods: a config type registered under a command -------------------------------------


@dataclass(frozen=True)
class Method:
    """A method of a command: its name, config type, one-line summary for ``--help``, and
    the handler the command's code calls for it (its shape is the command's business)."""

    command: str
    name: str
    config: type
    summary: str
    handler: Any = None


class MethodRegistry:
    """Methods per command, found by name or by the type of their config."""

    def __init__(self) -> None:
        self._by_type: dict[type, Method] = {}

    def register(self, command: str, config: type, summary: str, handler: Any = None) -> None:
        if config in self._by_type:
            raise ValueError(f"{config.__name__} is registered twice")
        name = config.TYPE  # type: ignore[attr-defined]
        self._by_type[config] = Method(command, name, config, summary, handler)

    def of(self, config: Any, command: str) -> Method:
        """The method of ``command`` that a config instance selects (dispatch on its type)."""
        method = self._by_type.get(type(config))
        if method is None or method.command != command:
            names = ", ".join(m.config.__name__ for m in self.methods(command).values())
            raise OptlabError(f"{type(config).__name__} is not a {command} config: use {names}")
        return method

    def methods(self, command: str) -> dict[str, Method]:
        return {m.name: m for m in self._by_type.values() if m.command == command}

    def get(self, command: str, name: str) -> Method:
        methods = self.methods(command)
        if name not in methods:
            raise did_you_mean(f"{command} method", name, methods)
        return methods[name]


METHODS = MethodRegistry()
