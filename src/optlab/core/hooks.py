"""How packages above core add entries to core's (and eval's) tables without being imported.

Core sits at the bottom of the layering and imports nothing above it, yet some of its
look-ups must find entries that method packages add: ``load_model`` a quantized run's loader
(``optlab.quant``), eval's task table the ``unlearn:RUN`` tasks (``optlab.unlearning``). Each such
package registers its entries when it is imported. :mod:`optlab.plugins`, at the top, names
those packages per table and installs the importer; a look-up calls :func:`import_plugins`
first, so a fresh process finds the entries without anyone importing the packages by hand.
Torch-free, as ``import optlab`` runs it.
"""

from __future__ import annotations

from collections.abc import Callable

MODEL_LOADERS = "model_loaders"
EVAL_TASKS = "eval_tasks"
COMMANDS = "commands"  # core.job's command table: what a config.yaml or a recipe may name

_importer: Callable[[str], None] | None = None


def set_importer(importer: Callable[[str], None]) -> None:
    """Install the function that imports the packages registering entries in a table."""
    global _importer
    _importer = importer


def import_plugins(table: str) -> None:
    """Import the packages that register entries in ``table`` (cheap once they are loaded)."""
    if _importer is not None:
        _importer(table)
