"""The one exception type for mistakes a user can fix (bad paths, names, specs, budgets)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable


class OptlabError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""


def did_you_mean(kind: str, name: str, valid: Iterable[str]) -> OptlabError:
    """Build the error for an unknown name, suggesting the closest valid ones."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return OptlabError(f"unknown {kind} {name!r}.{hint} Valid: {', '.join(valid)}.")


def require_finite(name: str, value: float | None) -> None:
    """Refuse NaN and infinities in a config value: comparisons with NaN are all false, so a
    NaN slips through every range check after it and surfaces later as a wrong number."""
    if value is not None and not math.isfinite(value):
        raise OptlabError(f"{name} must be a finite number, got {value}")
