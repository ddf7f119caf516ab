"""One scoring path for every evaluation, with lm-evaluation-harness meanings.

``loglikelihood`` scores a continuation given a context, ``rolling_loglikelihood`` scores a
whole text in context-length windows, ``generate`` decodes greedily until a stop string.
All three batch their work and show a progress bar; perplexity, multiple choice, probes and
retrieval scoring are all built on them.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from optlab.core.decode import eos_ids, greedy
from optlab.core.models import LoadedModel
from optlab.errors import OptlabError

log = logging.getLogger("optlab")

MAX_CONTEXT = 2048  # the papers' context length; longer native contexts are capped for speed


def native_context(model: torch.nn.Module) -> int | None:
    """The most positions the model was built for (None when its config does not say)."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def context_length(model: torch.nn.Module) -> int:
    """The default window: the native context, capped at ``MAX_CONTEXT``."""
    return min(native_context(model) or MAX_CONTEXT, MAX_CONTEXT)


def window_length(
    model: torch.nn.Module,
    requested: int | None,
    *,
    what: str = "--seq-len",
    default: int | None = None,
) -> int:
    """The token window a command really uses, checked once for every command.

    An explicit length beyond the model's native context is an error naming both numbers (a
    model cannot attend past its positions, and a silently shorter window would give a wrong
    figure). No length, or the command's documented ``default`` (the CLI cannot tell an
    omitted flag from its default value), is capped at the context (and ``MAX_CONTEXT``).

    >>> window_length(load_model("tiny:opt").model, None)          # the context: 256
    >>> window_length(load_model("tiny:opt").model, 512, default=512)  # capped: 256
    >>> window_length(load_model("tiny:opt").model, 5000)          # OptlabError
    """
    if requested is not None and requested < 1:
        raise OptlabError(f"{what} must be a positive number of tokens, got {requested}")
    if requested is None or requested == default:
        cap = context_length(model)
        if requested is not None and requested > cap:
            log.debug("%s %d is more than the model's context: using %d", what, requested, cap)
        return cap if requested is None else min(requested, cap)
    native = native_context(model)
    if native is not None and requested > native:
        raise OptlabError(f"{what} {requested} exceeds the model's context length {native}; "
                          f"give at most {native} tokens")  # fmt: skip
    return requested


class Scorer:
    """Score and generate text with a loaded model.

    >>> scorer = Scorer(load_model("default"))
    >>> scorer.loglikelihood([("The capital of France is", " Paris")])
    [(-1.2, True)]
    """

    def __init__(
        self,
        lm: LoadedModel,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        progress: bool = True,
        compile: bool = False,
    ) -> None:
        self.model = lm.model
        self.compile = compile  # generate's one-token step through torch.compile
        self.tokenizer = lm.tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or context_length(lm.model)
        self.progress = progress
        tok = lm.tokenizer
        # Scores the first token of a text with no context, as lm-eval's prefix token does.
        self.prefix_token_id = None if tok is None else (
            tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        )  # fmt: skip

    @classmethod
    def of_tokens(cls, model: torch.nn.Module, *, batch_size: int = 8) -> Scorer:
        """A scorer of token ids only (``score_tokens`` and what builds on it): for a method
        that holds a model and calibration windows but no tokenizer, e.g. a sensitivity scan."""
        return cls(LoadedModel(model, None, "token windows"), batch_size=batch_size,  # type: ignore[arg-type]
                   progress=False)  # fmt: skip

    def windows_nll(self, windows: Sequence[torch.Tensor]) -> float:
        """Mean negative log-likelihood of every token after the first of each window, over
        batches of equal-length token windows (the calibration loss of a model)."""
        requests = [(row.tolist(), row.shape[0] - 1) for ids in windows for row in ids]
        logprob = sum(lp for lp, _ in self.score_tokens(requests, desc="nll"))
        return -logprob / sum(n for _, n in requests)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each (context, continuation): log P(continuation | context) and whether the
        continuation is the greedy decoding. Trailing spaces of the context move to the
        continuation, as in lm-evaluation-harness."""
        return self.score_tokens(self.continuation_tokens(requests), desc="loglikelihood")

    def continuation_tokens(
        self, requests: Sequence[tuple[str, str]]
    ) -> list[tuple[list[int], int]]:
        """The (tokens, continuation length) pairs :meth:`loglikelihood` scores: for callers
        that need the token count too (a mean NLL per answer token)."""
        scored = []
        for context, continuation in requests:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            if context:
                context_ids = self.encode(context)
                continuation_ids = self.encode(context + continuation)[len(context_ids) :]
            else:
                context_ids, continuation_ids = [self.prefix_token_id], self.encode(continuation)
            scored.append((context_ids + continuation_ids, len(continuation_ids)))
        return scored

    def rolling_loglikelihood(self, texts: Sequence[str]) -> list[float]:
        """Total log-likelihood of each text, in disjoint windows of ``max_length`` tokens;
        each window is conditioned on the tokens just before it (the first on the prefix)."""
        requests, owners = [], []
        for owner, text in enumerate(texts):
            ids = [self.prefix_token_id, *self.encode(text)]
            for start in range(1, len(ids), self.max_length):
                end = min(start + self.max_length, len(ids))
                requests.append((ids[max(0, end - self.max_length - 1) : end], end - start))
                owners.append(owner)
        totals = [0.0] * len(texts)
        for owner, (logprob, _) in zip(
            owners, self.score_tokens(requests, desc="rolling loglikelihood"), strict=True
        ):
            totals[owner] += logprob
        return totals

    @torch.no_grad()
    def score_tokens(
        self, requests: Sequence[tuple[Sequence[int], int]], desc: str = "scoring"
    ) -> list[tuple[float, bool]]:
        """The core: for (tokens, n) pairs, the summed log-probability of the last n tokens
        given the ones before, and whether each of those tokens is the argmax. Sequences longer
        than ``max_length + 1`` are truncated from the left; asking for more scored tokens than
        that window (or the sequence) holds is an error, never a silently shorter sum that a
        caller would divide by the wrong count."""
        for tokens, n in requests:
            if not 1 <= n <= min(len(tokens) - 1, self.max_length):
                raise OptlabError(
                    f"cannot score {n} tokens of a {len(tokens)}-token sequence in a window of "
                    f"{self.max_length} tokens: give shorter texts or a longer window"
                )
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        rows = [list(tokens)[-(self.max_length + 1) :] for tokens, _ in requests]
        # Requests that feed the model the same tokens share one forward: a multiple-choice
        # context followed by one-token choices (" negative" / " positive") is run once.
        shared: dict[tuple[int, ...], list[int]] = {}
        for i, row in enumerate(rows):
            shared.setdefault(tuple(row[:-1]), []).append(i)
        inputs = list(shared)
        # The positions that predict a scored token: the last `count` of each input (the
        # longest request of a shared input decides).
        counts = [max(requests[i][1] for i in owners) for owners in shared.values()]
        plan = _plan_batches(inputs, counts, self.batch_size)
        with contextlib.ExitStack() as kept:
            total = sum(len(group) for _, group in plan)
            bar = kept.enter_context(tqdm(total=total, desc=desc, leave=False,
                                          disable=not self.progress or None))  # fmt: skip
            # Layers that rebuild their weight on each forward (quant's QuantLinear dequantizes)
            # build it once for the batches of this call only.
            for module in self.model.modules():
                if callable(getattr(module, "keep_weights", None)):
                    kept.enter_context(module.keep_weights())
            for prefix, group in plan:
                cache = self._prefix_cache(inputs[group[0]][:prefix]) if prefix else None
                for start in range(0, len(group), self.batch_size):
                    batch = group[start : start + self.batch_size]
                    logits = self._forward([inputs[u] for u in batch], [counts[u] for u in batch],
                                           prefix, cache)  # fmt: skip
                    for row_logits, u in zip(logits.split([counts[u] for u in batch]), batch,
                                             strict=True):  # fmt: skip
                        for i in shared[inputs[u]]:
                            results[i] = self._score_row(row_logits, rows[i], requests[i][1])
                    bar.update(len(batch))
        return results  # type: ignore[return-value]

    def _prefix_cache(self, prefix: Sequence[int]) -> Any:
        """The model's cache after ``prefix`` (one row; no position reaches the LM head)."""
        head = torch.tensor([list(prefix)], device=self.device)
        nothing = torch.zeros_like(head, dtype=torch.bool)
        return self.model(input_ids=head, use_cache=True, logits_to_keep=nothing).cache

    def _forward(
        self, inputs: list[tuple[int, ...]], counts: list[int], prefix: int, cache: Any = None
    ) -> torch.Tensor:
        """The logits at the last ``counts[r]`` positions of each input, row after row
        (kept positions, vocabulary). Only those positions reach the LM head: on the default
        model (49k-token vocabulary) the head is a fifth of the work at each position, and a
        multiple-choice input scores one or two of a hundred. With ``prefix`` > 0 the inputs
        share their first ``prefix`` tokens, already run into ``cache`` (left as it is: the
        next batch of the same prefix reads it too); the rows run only the rest."""
        pad = (self.tokenizer.pad_token_id if self.tokenizer is not None else None) or 0
        extra = {}
        if prefix:
            rows_cache = copy.deepcopy(cache)
            rows_cache.batch_repeat_interleave(len(inputs))
            extra = {"cache": rows_cache, "use_cache": True}
        width = max(len(row) for row in inputs) - prefix
        ids = torch.full((len(inputs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(inputs), prefix + width), dtype=torch.long)
        keep = torch.zeros((len(inputs), width), dtype=torch.bool)
        for r, (row, n) in enumerate(zip(inputs, counts, strict=True)):
            ids[r, : len(row) - prefix] = torch.tensor(row[prefix:])
            mask[r, : len(row)] = 1
            keep[r, len(row) - prefix - n : len(row) - prefix] = True
        return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                          logits_to_keep=keep.to(self.device), **extra).logits.float()  # fmt: skip

    @staticmethod
    def _score_row(logits: torch.Tensor, row: list[int], n: int) -> tuple[float, bool]:
        """Log-probability of the last ``n`` tokens of ``row`` and whether each is the argmax,
        from the logits of the forward on ``row[:-1]`` at its last positions (at least ``n``
        of them; ``n`` fits the row: checked above)."""
        targets = torch.tensor(row[-n:], device=logits.device)
        logprobs = F.log_softmax(logits[-n:], dim=-1)
        total = logprobs.gather(1, targets[:, None]).sum().item()
        return total, bool((logprobs.argmax(-1) == targets).all())

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        until: Sequence[str] | None = None,
        max_new_tokens: int = 64,
    ) -> list[str]:
        """Greedy continuations of each prompt (:func:`optlab.core.decode.greedy`, compiled
        if this scorer was made with ``compile=True``), cut before the first stop string in
        ``until``."""
        outputs: list[str] = []
        tok = self.tokenizer
        # Prompt and new tokens share the positions: the prompt keeps its last `room` tokens.
        context = min(self.max_length, native_context(self.model) or self.max_length)
        room = context - max_new_tokens
        if max_new_tokens < 1 or room < 1:
            raise OptlabError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in "
                              f"the model's context of {context} tokens; give 1 to "
                              f"{context - 1}")  # fmt: skip
        batches = [
            prompts[i : i + self.batch_size] for i in range(0, len(prompts), self.batch_size)
        ]
        for batch in tqdm(batches, desc="generate", disable=not self.progress or None, leave=False):
            encoded = [self.encode(p)[-room:] for p in batch]
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0

            def stopped(row: int, new: list[int]) -> bool:
                # A row ends at a stop string in its continuation (the text is cut below).
                text = tok.decode(new, skip_special_tokens=True)
                return any(s in text for s in until or ())

            generated = greedy(self.model, encoded, max_new_tokens, pad_id=pad,
                               eos=eos_ids(self.model, tok), stop=stopped if until else None,
                               compile=self.compile)  # fmt: skip
            for row in generated:
                text = tok.decode(row, skip_special_tokens=True)
                for stop in until or ():
                    text = text.split(stop, 1)[0]
                outputs.append(text)
        return outputs


# What a forward costs beyond its tokens, in tokens: every weight is read once per forward
# (the default model's 540 MB of fp32 take ~100 ms a forward on one thread, a token ~2.2 ms).
FORWARD_COST_TOKENS = 48
# How far back a group of inputs sharing a prefix may reach (bounds the planning time).
MAX_GROUP = 256


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _plan_batches(
    inputs: Sequence[tuple[int, ...]], counts: Sequence[int], batch_size: int
) -> list[tuple[int, list[int]]]:
    """(shared prefix length, input indices) per group of forwards. A group of inputs that
    begin with the same tokens (ending before any scored position) runs them once, then its
    rows' remaining tokens in batches of ``batch_size``; the other inputs are batched longest
    first (batches of similar length waste little padding), prefix 0.

    Retrieval scoring reads ``demo \\n input option`` with each demonstration before many
    inputs; a multiple-choice context precedes each of its multi-token options. Which inputs
    group, and at which prefix, is chosen over the sorted inputs by dynamic programming on
    the tokens a forward computes plus ``FORWARD_COST_TOKENS`` a forward: a group of n rows
    at prefix L saves (n - 1) L tokens and costs one forward more (and partly empty batches).
    """
    order = sorted(range(len(inputs)), key=lambda u: inputs[u])
    room = [len(inputs[u]) - counts[u] for u in order]  # the longest prefix each row allows
    after = [0] + [_common_prefix(inputs[a], inputs[b]) for a, b in itertools.pairwise(order)]
    # saved[j]: the most tokens saved on the first j sorted inputs; start[j]: where the
    # group ending at j begins (j - 1 when input j - 1 is batched alone) and its prefix.
    saved, start = [0.0] * (len(order) + 1), [(0, 0)] * (len(order) + 1)
    per_row = FORWARD_COST_TOKENS / batch_size
    for j in range(1, len(order) + 1):
        saved[j], start[j] = saved[j - 1], (j - 1, 0)
        prefix = room[j - 1]
        for i in range(j - 2, max(-1, j - 1 - MAX_GROUP), -1):
            prefix = min(prefix, after[i + 1], room[i])
            if prefix == 0:
                break
            n = j - i
            gain = (n - 1) * prefix + n * per_row - FORWARD_COST_TOKENS * (1 + -(-n // batch_size))
            if saved[i] + gain > saved[j]:
                saved[j], start[j] = saved[i] + gain, (i, prefix)
    planned: list[tuple[int, list[int]]] = []
    alone: list[int] = []
    j = len(order)
    while j > 0:
        i, prefix = start[j]
        if prefix:
            group = sorted(order[i:j], key=lambda u: -len(inputs[u]))
            planned.append((prefix, group))
        else:
            alone.append(order[j - 1])
        j = i
    alone.sort(key=lambda u: -len(inputs[u]))
    planned.reverse()
    planned += [(0, alone[i : i + batch_size]) for i in range(0, len(alone), batch_size)]
    return planned
