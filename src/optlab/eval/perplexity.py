"""Perplexity over non-overlapping windows: exp of the mean token negative log-likelihood."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from optlab.core.config import configurable, option, require_positive
from optlab.core.data import load_text, token_windows
from optlab.core.models import LoadedModel
from optlab.eval.scorer import Scorer, context_length, window_length

log = logging.getLogger("optlab")


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    tokens: int  # predicted tokens
    windows: int
    seq_len: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def perplexity(
    scorer: Scorer,
    text: str,
    *,
    seq_len: int | None = None,
    limit: int | None = None,
    what: str = "--seq-len",
) -> Perplexity:
    """Split ``text`` into consecutive windows of ``seq_len`` tokens (the scorer's context by
    default; the remainder is dropped), score every token after the first of each window, and
    return exp(mean NLL). ``limit`` keeps only the first windows, for quick looks. A window
    longer than the model's context is refused (:func:`window_length`; ``what`` names the
    option in the error).

    This is the WikiText protocol of the pruning and quantization papers.
    """
    if seq_len is None:
        seq_len = min(scorer.max_length, context_length(scorer.model))
    seq_len = window_length(scorer.model, seq_len, what=what)
    windows = token_windows(scorer.tokenizer, text, seq_len, limit=limit)
    requests = [(window.tolist(), seq_len - 1) for window in windows]
    logprob = sum(lp for lp, _ in scorer.score_tokens(requests, desc="perplexity"))
    tokens = sum(n for _, n in requests)  # score_tokens scores exactly these, or refuses
    nll = -logprob / tokens
    return Perplexity(math.exp(nll), nll, tokens, len(requests), seq_len)


def wiki_perplexity(
    lm: LoadedModel,
    seq_len: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    *,
    what: str = "--eval-seq-len",
    default: int | None = None,
) -> dict[str, Any]:
    """Perplexity on the held-out Wikipedia text (``wiki:eval``), as every method reports it.
    ``seq_len`` goes through :func:`window_length` (``default``: the calling command's
    documented default, capped at the context rather than refused)."""
    seq_len = window_length(lm.model, seq_len, what=what, default=default)
    scorer = Scorer(lm, progress=progress, max_length=seq_len)
    result = perplexity(scorer, load_text("wiki:eval"), seq_len=seq_len, limit=limit,
                        what=what).to_dict()  # fmt: skip
    log.info("wiki:eval perplexity %.3f (%d x %d tokens)", result["perplexity"],
             result["windows"], result["seq_len"])  # fmt: skip
    return result


@configurable("perplexity")
@dataclass(frozen=True)
class PerplexityEval:
    """The ``wiki:eval`` perplexity a command measures after its work (``enabled=False``:
    none). ``seq_len`` defaults to the command's calibration or training length."""

    enabled: bool = option(True, "skip the wiki:eval perplexity", flag="--no-eval")
    limit: int | None = option(None, "first N perplexity windows only", flag="--eval-limit")
    seq_len: int | None = option(None, "perplexity window (default: --seq-len)",
                                 flag="--eval-seq-len")  # fmt: skip

    def __post_init__(self) -> None:
        require_positive(self, "limit", "seq_len")

    def window(self, lm: LoadedModel, seq_len: int | None) -> int | None:
        """The window :meth:`measure` scores (None when disabled), checked against the model:
        commands ask before their work, so a bad ``--eval-seq-len`` fails at once."""
        if not self.enabled:
            return None
        return window_length(lm.model, self.seq_len if self.seq_len is not None else seq_len,
                             what=self._flag)  # fmt: skip

    @property
    def _flag(self) -> str:
        return "--eval-seq-len" if self.seq_len is not None else "--seq-len"

    def measure(self, lm: LoadedModel, seq_len: int | None, progress: bool = True) -> Any:
        """The perplexity dict, or None when disabled; ``seq_len`` is the command's default."""
        window = self.window(lm, seq_len)
        if window is None:
            return None
        return wiki_perplexity(lm, window, self.limit, progress, what=self._flag)
