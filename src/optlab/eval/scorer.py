"""One scoring path for every evaluation, with lm-evaluation-harness meanings.

``loglikelihood`` scores a continuation given a context, ``rolling_loglikelihood`` scores a
whole text in context-length windows, ``generate`` decodes greedily until a stop string.
All three batch their work and show a progress bar; perplexity, multiple choice, probes and
retrieval scoring are all built on them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from optlab.core.models import LoadedModel

MAX_CONTEXT = 2048  # the papers' context length; longer native contexts are capped for speed


def context_length(model: torch.nn.Module) -> int:
    config = model.config
    native = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0)
    return min(native or MAX_CONTEXT, MAX_CONTEXT)


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
    ) -> None:
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or context_length(lm.model)
        self.progress = progress
        tok = lm.tokenizer
        # Scores the first token of a text with no context, as lm-eval's prefix token does.
        self.prefix_token_id = (
            tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each (context, continuation): log P(continuation | context) and whether the
        continuation is the greedy decoding. Trailing spaces of the context move to the
        continuation, as in lm-evaluation-harness."""
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
        return self.score_tokens(scored, desc="loglikelihood")

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
        than ``max_length + 1`` are truncated from the left."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # Longest first: batches of similar length waste little padding.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
        pad = self.tokenizer.pad_token_id or 0
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc=desc, disable=not self.progress or None, leave=False):
            rows = [list(requests[i][0])[-(self.max_length + 1) :] for i in batch]
            width = max(len(r) for r in rows) - 1
            inputs = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(inputs)
            for r, row in enumerate(rows):
                inputs[r, : len(row) - 1] = torch.tensor(row[:-1])
                mask[r, : len(row) - 1] = 1
            logits = self.model(
                input_ids=inputs.to(self.device), attention_mask=mask.to(self.device)
            ).logits.float()
            for r, (i, row) in enumerate(zip(batch, rows, strict=True)):
                n = min(requests[i][1], len(row) - 1)
                positions = slice(len(row) - 1 - n, len(row) - 1)
                targets = torch.tensor(row[-n:], device=logits.device)
                logprobs = F.log_softmax(logits[r, positions], dim=-1)
                total = logprobs.gather(1, targets[:, None]).sum().item()
                greedy = bool((logprobs.argmax(-1) == targets).all())
                results[i] = (total, greedy)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        until: Sequence[str] | None = None,
        max_new_tokens: int = 64,
    ) -> list[str]:
        """Greedy continuations of each prompt, cut before the first stop string in ``until``."""
        outputs: list[str] = []
        tok = self.tokenizer
        batches = [
            prompts[i : i + self.batch_size] for i in range(0, len(prompts), self.batch_size)
        ]
        for batch in tqdm(batches, desc="generate", disable=not self.progress or None, leave=False):
            encoded = [self.encode(p)[-(self.max_length - max_new_tokens) :] for p in batch]
            width = max(len(e) for e in encoded)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            # Left padding, so every prompt ends where generation starts.
            inputs = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
            generated = self.model.generate(
                input_ids=inputs.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                # Stop decoding once every row has a stop string (the text is cut below).
                **({"stop_strings": list(until), "tokenizer": tok} if until else {}),
            )
            for row in generated[:, width:]:
                text = tok.decode(row, skip_special_tokens=True)
                for stop in until or ():
                    text = text.split(stop, 1)[0]
                outputs.append(text)
        return outputs
