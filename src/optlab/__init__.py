"""optlab: compress, accelerate, unlearn, audit, embed with and prompt causal LMs.

>>> import optlab
>>> lm = optlab.load_model("default")
>>> optlab.evaluate(lm, ["ppl:wiki"], seq_len=512, limit=40)

The API is imported lazily so that ``optlab --help`` does not pay for torch.
"""

from __future__ import annotations

from typing import Any

from optlab import plugins as _plugins  # noqa: F401  (lets core find quant's and unlearn's entries)

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    import importlib

    if name == "api":  # `from optlab import api` asks here before importing the submodule
        raise AttributeError(name)
    api = importlib.import_module("optlab.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'optlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    import importlib

    api = importlib.import_module("optlab.api")

    return sorted([*globals(), *api.__all__])
