"""The packages that register entries in core's and eval's tables, named once.

A package listed here adds its entries when imported (``optlab.quant`` calls
``core.models.register_loader`` for its packed-weight folders; ``optlab.unlearning`` calls
``eval.tasks.register_prefix`` for ``unlearn:RUN``). Core and eval cannot import these
packages (they sit below them), so this module, above every layer, installs the importer
that their look-ups call through :mod:`optlab.core.hooks`. The names are strings imported on
first look-up, not at ``import optlab``, so ``optlab --help`` still does not pay for torch.
"""

from __future__ import annotations

import importlib

from optlab.core import hooks

PLUGINS: dict[str, tuple[str, ...]] = {
    hooks.MODEL_LOADERS: ("optlab.quant",),
    hooks.EVAL_TASKS: ("optlab.unlearning",),
    hooks.COMMANDS: ("optlab.commands",),
}


def import_plugins(table: str) -> None:
    """Import every package that registers entries in ``table``."""
    for name in PLUGINS.get(table, ()):
        importlib.import_module(name)


hooks.set_importer(import_plugins)
