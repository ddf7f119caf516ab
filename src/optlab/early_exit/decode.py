"""Greedy generation with per-token early exits over a KV cache, and exact self-speculation.

:class:`LayerStack` runs a causal LM's decoder blocks one at a time over a cache whose layers
may hold different numbers of positions. The model's own forward prepares what each block is
called with (embeddings, position embeddings or rotary tables, masks: they differ per
family), captured by :func:`optlab.core.layerwise._capture` with the cache pretending to hold
``c`` positions, so every family runs through the same code.

When a token exits after layer ``l``, the keys and values of the layers above are missing:

* ``copy`` (CALM): run each skipped block on the exit state as its input, only as far as
  writing its keys and values (the cache stops the block there), so every layer holds
  every position;
* ``recompute`` (lazy): leave them missing. Layer ``j`` then holds a prefix of the positions;
  the next token that reaches ``j`` first runs the pending positions (their states after
  ``j - 1`` blocks are kept) through ``j`` in the same block call as itself. Every state is
  then the one an uncached model would compute under the same exit decisions.

Self-speculative decoding is the same machinery: a draft token is a token fed with a fixed
exit ``E`` (recompute), and verifying ``k`` drafts is feeding the last one through all layers:
the blocks above ``E`` run the whole pending chain in one call, the first ``E`` layers' cache
of the drafts is reused as it is; the rejected positions are cut from the cache afterwards.

>>> from optlab.early_exit.rules import NoExit
>>> lm = load_model("tiny:llama")
>>> ids = lm.tokenizer("def f(x):", return_tensors="pt").input_ids[0].tolist()
>>> out = generate(lm, ids, NoExit(), (2,), max_new_tokens=4)
>>> ref = lm.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=4)
>>> out.tokens == ref[0, len(ids):].tolist(), out.layers
(True, [2, 2, 2, 2])
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from optlab.core.anatomy import Anatomy
from optlab.core.decode import eos_ids
from optlab.core.layerwise import _capture, call_block
from optlab.core.models import LoadedModel
from optlab.early_exit.exits import ExitRule
from optlab.early_exit.rules import ExitHead
from optlab.errors import OptlabError

KV_MODES = ("copy", "recompute")


class _Written(Exception):
    """Raised by the cache once a fill-only block has written its keys and values."""


class ExitCache(DynamicCache):
    """A full (never windowed) cache layer per block; layers may hold different lengths.

    ``view = c`` makes the model's forward see ``c`` cached positions in every layer, so it
    prepares masks and positions for a chunk that starts at ``c``. With ``fill_only`` an
    attention raises :class:`_Written` right after storing its keys and values. Sliding-window
    layers keep every position too: their masks apply the window.
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.layers = [DynamicLayer() for _ in range(num_layers)]
        self.view: int | None = None
        self.fill_only = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.view if self.view is not None else super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if self.view is not None:
            return self.view + query_length, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # type: ignore[no-untyped-def]
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.fill_only:
            raise _Written
        return keys, values

    def lengths(self) -> list[int]:
        return [layer.get_seq_length() for layer in self.layers]

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions of every layer."""
        for layer in self.layers:
            if layer.get_seq_length() > length:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]


class LayerStack:
    """A model's blocks run one at a time over an :class:`ExitCache` (batch 1).

    ``ids`` are the positions fed so far; ``hidden[0, p]`` is position ``p``'s state after
    the blocks it has run (what a pending position enters the next block with).
    """

    def __init__(self, lm: LoadedModel) -> None:
        self.model = lm.model
        self.anatomy = Anatomy.of(lm.model)
        self.blocks = self.anatomy.blocks
        self.num_layers = len(self.blocks)
        self.device = lm.device
        self.cache = ExitCache(self.num_layers)
        self.ids: list[int] = []
        self.hidden: torch.Tensor | None = None
        self.last: torch.Tensor | None = None  # the last position's state the rule last judged
        self.recomputed = 0  # (position, block) pairs run for pending positions
        self.filled = 0  # (position, block) pairs whose keys/values were copied from an exit

    def _context(self, start: int) -> tuple[torch.Tensor, list[tuple], list[dict]]:
        """Block 0's input and every block's arguments for the chunk ``ids[start:]``."""
        self.cache.view = start
        try:
            feed = {"input_ids": torch.tensor([self.ids[start:]], device=self.device),
                    "cache": self.cache}  # fmt: skip
            inputs, args, kwargs = _capture(self.model, self.anatomy, [feed], self.device)
        finally:
            self.cache.view = None
        return inputs[0], args[0], kwargs[0]

    @torch.no_grad()
    def feed(
        self,
        tokens: Sequence[int],
        *,
        depth: int | None = None,
        rule: ExitRule | None = None,
        exits: Sequence[int] = (),
        kv: str = "recompute",
    ) -> tuple[torch.Tensor, int]:
        """Feed new positions and run blocks 1, 2, ... up to ``depth`` (all by default), or
        until ``rule`` says exit at one of ``exits`` below the final layer (judging the last
        position's state). Returns the last block's output over its chunk ([1, n, hidden]:
        the new positions, preceded by the pending ones it ran) and the blocks run."""
        depth = depth or self.num_layers
        start = len(self.ids)
        self.ids.extend(tokens)
        contexts = {start: self._context(start)}
        first = contexts[start][0]
        self.hidden = first if self.hidden is None else torch.cat([self.hidden, first], dim=1)
        allowed = set(exits)
        out, layer = first, 0
        for layer in range(1, depth + 1):
            begin = self.cache.layers[layer - 1].get_seq_length()
            if begin not in contexts:
                contexts[begin] = self._context(begin)
            _, args, kwargs = contexts[begin]
            out = call_block(self.blocks[layer - 1], self.hidden[:, begin:], args[layer - 1],
                             kwargs[layer - 1])  # fmt: skip
            self.hidden[:, begin:] = out
            self.recomputed += start - begin
            self.last = out[0, -1]
            if rule is not None and layer in allowed and layer < self.num_layers and \
                    rule.should_exit(layer, self.last):  # fmt: skip
                break
        if kv == "copy" and layer < self.num_layers:
            self._fill(start, layer, contexts[start])
        return out, layer

    def _fill(self, start: int, layer: int, context: tuple) -> None:
        """CALM's copy: the skipped blocks' keys and values from the exit state as their input."""
        if any(n != start for n in self.cache.lengths()[layer:]):
            raise RuntimeError("copy needs every skipped layer to hold all earlier positions")
        _, args, kwargs = context
        exit_state = self.hidden[:, start:]
        self.cache.fill_only = True
        try:
            for index in range(layer, self.num_layers):
                try:
                    call_block(self.blocks[index], exit_state, args[index], kwargs[index])
                except _Written:
                    pass
                else:
                    raise RuntimeError(f"block {index} wrote no keys and values")
        finally:
            self.cache.fill_only = False
        self.filled += exit_state.shape[1] * (self.num_layers - layer)

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (rejected drafts)."""
        del self.ids[length:]
        if self.hidden is not None:
            self.hidden = self.hidden[:, :length]
        self.cache.truncate(length)


@dataclass
class Generation:
    """One sample's continuation: its tokens, the layers each ran, and the cost."""

    tokens: list[int]
    layers: list[int]
    seconds: float
    drafted: int = 0
    accepted: int = 0
    recomputed: int = 0
    filled: int = 0
    rounds: int = 0

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_layers(self) -> float:
        return sum(self.layers) / len(self.layers) if self.layers else 0.0

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def _start(lm: LoadedModel, prompt: Sequence[int]) -> LayerStack:
    """A stack holding all but the prompt's last token (run through every layer): that last
    token is fed by the first step, so exit rules judge every generated token."""
    if not prompt:
        raise OptlabError("the prompt is empty: give at least one token of text")
    stack = LayerStack(lm)
    if len(prompt) > 1:
        stack.feed(prompt[:-1])
    return stack


def generate(
    lm: LoadedModel,
    prompt: Sequence[int],
    rule: ExitRule,
    exits: Sequence[int],
    *,
    kv: str = "copy",
    max_new_tokens: int = 15,
    head: ExitHead | None = None,
) -> Generation:
    """Greedy decoding, one token per step, each stopping where ``rule`` says among
    ``exits``; the skipped layers' keys and values by ``kv`` (copy or recompute). ``head``:
    the :class:`ExitHead` a confidence rule reads, so the exit logits are computed once."""
    if kv not in KV_MODES:
        raise OptlabError(f"--kv {kv!r}: choose copy or recompute")
    head = head or ExitHead(Anatomy.of(lm.model))
    stop = eos_ids(lm.model, lm.tokenizer)
    begin = time.perf_counter()
    stack = _start(lm, prompt)
    token, tokens, layers = prompt[-1], [], []
    for _ in range(max_new_tokens):
        _, layer = stack.feed([token], rule=rule, exits=exits, kv=kv)
        token = int(head(stack.last).argmax())  # the same tensor a confidence rule read
        tokens.append(token)
        layers.append(layer)
        if token in stop:
            break
    return Generation(tokens, layers, time.perf_counter() - begin,
                      recomputed=stack.recomputed, filled=stack.filled)  # fmt: skip


def speculate(
    lm: LoadedModel,
    prompt: Sequence[int],
    draft_layer: int,
    *,
    draft_tokens: int = 4,
    max_new_tokens: int = 15,
) -> Generation:
    """Exact self-speculative greedy decoding: draft up to ``draft_tokens`` tokens greedily
    with the first ``draft_layer`` blocks and the model's own head, verify them with one
    pass of the blocks above (over the drafts' pending states) plus the last draft's full
    pass, keep the agreeing prefix and the full model's next token. The tokens equal the
    full model's greedy ones; ``layers`` holds each token's verified depth (all layers)."""
    anatomy = Anatomy.of(lm.model)
    num_layers = len(anatomy.blocks)
    if not 1 <= draft_layer < num_layers:
        raise OptlabError(f"--speculative {draft_layer}: the draft exit must be in "
                          f"1..{num_layers - 1} (the model has {num_layers} layers)")  # fmt: skip
    if draft_tokens < 1:
        raise OptlabError(f"--draft-tokens must be at least 1, got {draft_tokens}")
    stop = eos_ids(lm.model, lm.tokenizer)
    begin = time.perf_counter()
    stack = _start(lm, prompt)
    token, tokens = prompt[-1], []
    drafted = accepted = rounds = 0
    while len(tokens) < max_new_tokens:
        base = len(stack.ids)  # where ``token`` goes; every layer holds the positions before
        drafts: list[int] = []
        last = token
        for _ in range(min(draft_tokens, max_new_tokens - len(tokens) - 1)):
            out, _ = stack.feed([last], depth=draft_layer)
            last = int(anatomy.logits(out[0, -1]).argmax())
            drafts.append(last)
            if last in stop:
                break
        out, _ = stack.feed([last])  # the last block's chunk: token, then every draft
        verified = anatomy.logits(out[0]).argmax(-1).tolist()
        agree = 0
        while agree < len(drafts) and drafts[agree] == verified[agree]:
            agree += 1
        stack.truncate(base + agree + 1)
        new = [*drafts[:agree], verified[agree]]
        drafted, accepted, rounds = drafted + len(drafts), accepted + agree, rounds + 1
        token = new[-1]
        done = next((i for i, t in enumerate(new) if t in stop), None)
        tokens.extend(new if done is None else new[: done + 1])
        if done is not None:
            break
    tokens = tokens[:max_new_tokens]
    return Generation(tokens, [num_layers] * len(tokens), time.perf_counter() - begin,
                      drafted=drafted, accepted=accepted, recomputed=stack.recomputed,
                      rounds=rounds)  # fmt: skip
