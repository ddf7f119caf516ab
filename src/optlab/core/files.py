"""Reading a user's text files: every way a file can be unreadable is one line naming it.

Kept apart from :mod:`optlab.core.data` (which re-exports it) so that the model loader and
the run directory can read files without importing the corpora.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optlab.errors import OptlabError


def read_text_file(
    path: str | Path, what: str = "file", *, allow_empty: bool = False, encoding: str = "utf-8"
) -> str:
    """The text of a user's file, every way it can be unreadable turned into one line naming
    it: missing, a folder, unreadable, not UTF-8 (with the byte offset), or empty (blank)
    unless ``allow_empty``. ``what`` says what the file is for, e.g. ``"--forget file"``.

    >>> read_text_file("notes.txt", "--corpus file")
    """
    path = Path(path).expanduser()
    shown = repr(str(path))
    if path.is_dir():
        raise OptlabError(f"{what} {shown} is a folder, not a file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise OptlabError(f"{what} not found: {shown} (no such file)") from None
    except OSError as err:
        raise OptlabError(f"cannot read {what} {shown}: {err.strerror or err}") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise OptlabError(
            f"{what} {shown} is not {encoding.upper()} text: byte 0x{raw[err.start]:02x} at "
            f"offset {err.start} cannot be decoded (save it as UTF-8)"
        ) from None
    if not allow_empty and not text.strip():
        raise OptlabError(f"{what} {shown} is empty")
    # Newlines as text mode reads them: a file written on Windows parses the same.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_json_object(path: str | Path, what: str = "file", *, hint: str = "") -> dict[str, Any]:
    """The JSON object in a user's (or a run's) file, read by :func:`read_text_file`; bad
    JSON or a value that is not an object is one line naming the file (and ``hint``, what
    the file should be).

    >>> read_json_object("runs/w50/metrics.json", "run metrics")["perplexity"]
    """
    text = read_text_file(path, what)
    shown = repr(str(Path(path).expanduser()))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise OptlabError(f"{what} {shown} is not valid JSON ({err.msg}, line {err.lineno})"
                          f"{hint}") from None  # fmt: skip
    if not isinstance(data, dict):
        raise OptlabError(f"{what} {shown} holds a JSON {type(data).__name__}, not an "
                          f"object{hint}")  # fmt: skip
    return data
