"""The calibration data of a layer-wise method, as a spec: a corpus, a count and a length.

Methods take their data as an argument (token windows); this spec is how a command, a recipe
or a ``config.yaml`` names that data, and ``windows()`` resolves it the way the Wanda and
SparseGPT code draws calibration windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from optlab.core.config import configurable, option, require_positive
from optlab.core.data import load_text, sample_windows


@configurable("calibration")
@dataclass(frozen=True)
class Calibration:
    """``n`` random windows of ``seq_len`` tokens from ``corpus``, run ``batch_size`` at a time.

    >>> Calibration(n=32, seq_len=512)
    Calibration(corpus='wiki:calib', n=32, seq_len=512, batch_size=8)
    """

    corpus: str = option("wiki:calib", "calibration text: wiki:calib, book, code or a .txt file",
                         flag="--calib")  # fmt: skip
    n: int = option(128, "calibration windows", flag="--n-calib")
    seq_len: int | None = option(None, "tokens per window (default: the model's context, at "
                                 "most 2048)", flag="--seq-len")  # fmt: skip
    batch_size: int = option(8, "windows per forward pass")

    def __post_init__(self) -> None:
        require_positive(self, "n", "seq_len", "batch_size")

    def windows(self, tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int) -> torch.Tensor:
        """The (n, seq_len) token windows; ``seq_len`` is this spec's, resolved by the caller
        against the model's context."""
        return sample_windows(tokenizer, load_text(self.corpus), self.n, seq_len, seed)
