"""Registries of named callables, and frozen dataclass configs <-> plain dicts / YAML."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from optlab.errors import did_you_mean

T = TypeVar("T")


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


def config_to_dict(config: Any) -> dict[str, Any]:
    """A frozen dataclass config as plain data (tuples become lists), for config.yaml."""
    return _plain(dataclasses.asdict(config))


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a dataclass config, refusing keys it does not have."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown:
        raise did_you_mean(f"{cls.__name__} field", sorted(unknown)[0], fields)
    return cls(**data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
