"""The one exception type for mistakes a user can fix (bad paths, names, specs, budgets)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class OptlabError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""


def did_you_mean(kind: str, name: str, valid: Iterable[str]) -> OptlabError:
    """Build the error for an unknown name, suggesting the closest valid ones."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return OptlabError(f"unknown {kind} {name!r}.{hint} Valid: {', '.join(valid)}.")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): what a library's
    multi-line error says, fit for one ``optlab: error:`` line."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
