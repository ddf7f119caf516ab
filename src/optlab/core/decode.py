"""Greedy decoding over a static KV cache, the one-token step optionally ``torch.compile``d.

Every greedy generation of optlab (``Scorer.generate``: generation tasks, probes, retrieval
answers; unlearning's memorisation; the decode benchmark) runs :func:`greedy`. Where decode
time went with Hugging Face ``generate`` (profiled on SmolLM2-135M, batch 1, fp32, one thread
of a shared machine): the block linears (~70%), attention with rotary and cache updates
(~20%, a dozen small Python-level ops per layer, 30 layers), the 49152 x 576 LM head (~14%),
and ``generate``'s own bookkeeping (logits processors, stopping criteria, growing masks:
~1.7 ms a token on a 2-layer model, compiled steps 1.2 ms against 2.9 ms). So:

* the cache is a ``StaticCache`` whose length is rounded up to a power of two, and the
  attention mask spans it from the start (pads 0, prompt and future positions 1): every step
  has the same shapes, so one compiled graph serves a whole batch, and later batches of a
  similar length;
* prefill runs eagerly (a compiled graph per prompt length would cost more than it saves;
  packed layers dequantize there, which is fast for many rows);
* with ``compile=True`` the step (the model's forward on one token per row, and the argmax)
  is one ``torch.compile``d graph, built once per model and cache shape. Layers that hold
  a decode-only layout build it first through a ``prepare_decode()`` method, by that name
  (quant's ``QuantLinear``; core may not import it). Without a working compiler (inductor
  needs a C++ compiler on CPU) it logs one warning and decodes eagerly, token for token the
  same;
* a plain fp32 LM head whose weight holds only fp16 (or bf16) values, as a quantized run's
  16-bit head does, or any model loaded from a half-precision checkpoint, becomes a
  :class:`HalfWidthHead` for the compiled step: the same values read at half the bytes and
  summed in fp32. On the idle 2-core AMD EPYC (AVX2) machine, a one-row 49152 x 576 head took
  4.5 ms in the compiled step against 17.7 ms for fp32 ``F.linear`` (a third of the default
  model's packed 4-bit step before);
* dynamo checks ~11,000 guards on the model before every step (4.1-4.4 ms of a 34-40 ms
  step of the default packed model): the compiled step keeps those on its per-call arguments, on
  globals and on tensor aliasing, and :func:`structure` checks what the others did (classes,
  hooks, plain attributes, tensor shapes and dtypes) once per decoding, compiling a new
  step when it differs, so a hook or an attribute set between decodings still takes effect;
* grouped-query attention (the default model: 9 query heads on 3 key heads) attends without
  repeating the cache per query head (:func:`_grouped_attention`; transformers does this
  eagerly but not under ``torch.compile``, where it copied the whole cache in every layer).

Greedy means the argmax of the logits, no logits processor: the tokens equal Hugging Face
``generate(do_sample=False)`` of a model whose generation config adds none.

>>> lm = load_model("tiny:llama")
>>> ids = lm.tokenizer("def f(x):", add_special_tokens=False).input_ids
>>> greedy(lm.model, [ids], max_new_tokens=4)[0] == lm.model.generate(
...     torch.tensor([ids]), do_sample=False, max_new_tokens=4)[0, len(ids):].tolist()
True
"""

from __future__ import annotations

import logging
import re
import shutil
import types
import weakref
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger("optlab")

MIN_CACHE = 64
# More rows than this (a batch of prompts decoding together) and HalfWidthHead reads its
# weight once per row: F.linear's blocked GEMM is then the faster one.
HALF_MAX_ROWS = 4
# each model's compiled steps by structure; None: it cannot be compiled here
_compiled: weakref.WeakKeyDictionary[
    nn.Module, dict[tuple[Any, ...], Callable[..., torch.Tensor]] | None
] = weakref.WeakKeyDictionary()


def eos_ids(model: nn.Module, tokenizer: Any = None) -> set[int]:
    """The ids greedy decoding stops at (the generation config's, else the tokenizer's)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}


def compiler_available(device: torch.device | str = "cpu") -> bool:
    """Whether ``torch.compile`` can build kernels for ``device`` here: inductor writes C++
    for CPUs (it needs a compiler on PATH) and Triton for GPUs."""
    if torch.device(device).type == "cpu":
        return any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cache_length(needed: int, limit: int | None = None) -> int:
    """The static cache's length: ``needed`` rounded up to a power of two (at least
    ``MIN_CACHE``), so prompts of similar lengths share one compiled step; at most ``limit``
    (the model's context), when that still holds ``needed``."""
    length = max(MIN_CACHE, 1 << (needed - 1).bit_length())
    return min(length, limit) if limit is not None and limit >= needed else length


def _step(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
          cache: StaticCache) -> torch.Tensor:  # fmt: skip
    """One forward over the cache; the argmax of each row's last logits."""
    out = model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache,
                use_cache=True, logits_to_keep=1)  # fmt: skip
    return out.logits[:, -1].argmax(-1)


def _grouped_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Transformers' sdpa attention, but one query token of grouped-query attention attends
    without repeating the keys and values per query head: the query heads that share a key
    head become that head's rows, as transformers itself does eagerly (``pack_gqa``), but
    not under ``torch.compile``, where it copies the whole static cache, keys and values,
    in every layer of every step (the default model, 3 key heads for 9 query heads, with a
    512-slot cache: its packed step's compiled graph took 35.4 ms with the copies and 31.7
    without). The same products and softmax; anything else is transformers' own
    function."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, length, _ = query.shape
    plain = attention_mask is None or attention_mask.shape[1] == 1
    if length != 1 or groups == 1 or not plain or kwargs.get("position_bias") is not None \
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions"):  # fmt: skip
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)  # fmt: skip
    rows = query.reshape(batch, heads // groups, groups, query.shape[-1])
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask,
                                         dropout_p=dropout, scale=scaling)  # fmt: skip
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


# the compiled step's attention (a model set to "sdpa" runs it there, and only there)
DECODE_ATTENTION = "optlab_decode"
AttentionInterface.register(DECODE_ATTENTION, _grouped_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


class HalfWidthHead(nn.Linear):
    """An fp32 LM head whose weight values are all exact in fp16 or bf16, read at that width
    inside the compiled decoding step: one copy in the narrow dtype, each product summed in
    fp32, so the logits are ``F.linear``'s values up to the order of summation (no rounding of
    the input or the output, unlike a half-precision matmul, whose ties would flip greedy
    tokens). Outside ``torch.compile``, and for more than ``HALF_MAX_ROWS`` rows, it is plain
    ``F.linear``: prefill, scoring and training are unchanged. It shares the head's weight and
    bias (a tied head stays tied; the state dict keeps its keys). Before each compiled
    decoding (``prepare_decode``) the narrow copy is rebuilt if the weight changed, which its
    key tells (data pointer, version counter, dtype, device: another tensor, a move, an
    in-place update, a load), and dropped if it no longer fits the narrow dtype; a write
    through ``.data``, which bypasses the version counter, is the one change it cannot see."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._narrow: dict[str, Any] = {}

    @classmethod
    def of(cls, head: nn.Linear) -> HalfWidthHead:
        """A head computing with ``head``'s very weight and bias (no copy of either)."""
        new = cls(head.in_features, head.out_features, bias=False, device="meta")
        new.weight, new.bias = head.weight, head.bias
        return new.train(head.training)

    def prepare_decode(self) -> None:
        weight = self.weight.detach()
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._narrow.get("key") == key:
            return
        self._narrow.clear()
        if weight.dtype == torch.float32:
            for dtype in (torch.float16, torch.bfloat16):
                narrow = weight.to(dtype)
                if torch.equal(narrow.to(weight.dtype), weight):
                    self._narrow["weight"] = narrow
                    break
        self._narrow["key"] = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        narrow = self._narrow.get("weight") if torch.compiler.is_compiling() else None
        if narrow is None or x.dtype != torch.float32 or x.numel() > HALF_MAX_ROWS * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        # inductor fuses the upcast into the reduction: the [rows, out, in] product is never
        # materialised, and the weight is read once, in 2 bytes a value
        y = (narrow.to(x.dtype) * x.unsqueeze(-2)).sum(-1)
        return y if self.bias is None else y + self.bias


def _half_width_head(model: nn.Module) -> None:
    """Make the model's head a :class:`HalfWidthHead` where its weight fits fp16 or bf16
    (only a plain, unhooked ``nn.Linear`` head: anything else is left as it is)."""
    getter = getattr(model, "get_output_embeddings", None)
    setter = getattr(model, "set_output_embeddings", None)
    head = getter() if callable(getter) and callable(setter) else None
    if type(head) is not nn.Linear or head.weight.dtype != torch.float32:
        return
    if head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"):
        return
    candidate = HalfWidthHead.of(head)
    candidate.prepare_decode()
    if "weight" in candidate._narrow:
        setter(candidate)


def _prepare(model: nn.Module) -> None:
    for module in model.modules():
        if callable(getattr(module, "prepare_decode", None)):
            module.prepare_decode()


_SCALARS = frozenset({type(None), bool, int, float, str, torch.dtype, torch.device})


def _describe(value: Any, depth: int = 0, held: bool = False) -> Any:
    """A hashable account of a module attribute for :func:`structure`: a tensor by its
    class, shape, strides, dtype, device and ``requires_grad`` (what dynamo's tensor guards
    check), a scalar by its value, containers by their items, any other object by its type.
    Scalars ``held`` in a dict count by type only: a decode layout's key of data pointers
    and versions there is bookkeeping, not structure."""
    kind = type(value)
    if kind in _SCALARS:
        return kind if held else value
    if isinstance(value, dict):  # most are a module's empty hook dicts
        if not value or depth >= 3:
            return () if not value else kind
        return tuple((key, _describe(item, depth + 1, True)) for key, item in value.items())
    if isinstance(value, torch.Tensor):
        return kind, value.shape, value.stride(), value.dtype, value.device, value.requires_grad
    if isinstance(value, int | float | str):  # an enum, say
        return kind if held else value
    if (kind is tuple or kind is list) and depth < 3:
        return tuple(_describe(item, depth + 1, held) for item in value)
    return kind


def structure(model: nn.Module) -> tuple[Any, ...]:
    """What a compiled step's code depends on besides its tensors: the config, and every
    module's class (and its ``forward``), training flag, hooks and plain attributes. Read
    once per decoding, it stands in for dynamo's per-step guards on the model (see
    :func:`_compiled_step`); an in-place weight update leaves it unchanged. What it cannot
    see: a change inside a non-module object a module holds (counted by its type), or a
    scalar held in a dict (by its type)."""
    # the attention implementation is not in the config's json
    parts: list[Any] = [model.config.to_json_string(use_diff=False),
                        model.config._attn_implementation]  # fmt: skip
    for name, module in model.named_modules(remove_duplicate=False):
        kind = type(module)
        attributes = tuple((key, _describe(value)) for key, value in vars(module).items()
                           if key != "_modules")  # fmt: skip
        parts.append((name, kind, getattr(kind, "forward", None), attributes))
    return tuple(parts)


_MODEL_SOURCE = re.compile(r"^(\w+\()*model\b")


def _keeps(entries: list[Any]) -> list[bool]:
    """The guard filter of a compiled step: the guards on its per-call arguments (ids,
    positions, mask, cache), on globals and on which of the model's tensors are one
    (aliasing), not dynamo's ~11,000 others on the model (its modules' types, constants,
    hooks, dict keys, and its tensors' shapes and dtypes), which :func:`structure` checks
    once per decoding instead: on the 30-layer default model dynamo's check before each
    step fell from 4.1-4.4 ms to 0.65 ms."""
    return [_MODEL_SOURCE.match(e.name) is None or e.guard_type == "DUPLICATE_INPUT"
            for e in entries]  # fmt: skip


# How many structures of one model keep their compiled steps (a model switching between a
# few states, as a scorer's kept weights do, does not recompile each time).
MAX_STRUCTURES = 4


def _compiled_step(model: nn.Module) -> Callable[..., torch.Tensor] | None:
    """The model's compiled step for its present structure (built once per structure; None
    when no compiler can build it); every call first brings the decode-only layouts up to
    date with the weights. Each step compiles a fresh copy of :func:`_step`'s code object,
    since dynamo keys its cache on the code: with the model's guards dropped, that is what
    keeps another model, or another structure of this one, off a graph traced for this."""
    steps = _compiled.get(model, {})
    if steps is None:
        return None
    device = next(model.parameters()).device
    if not steps:
        if not compiler_available(device):
            log.warning("torch.compile needs a C++ compiler (g++ or clang++) on PATH for CPU "
                        "kernels, or Triton on a GPU: decoding without compiling")  # fmt: skip
            _compiled[model] = None
            return None
        _half_width_head(model)
        _compiled[model] = steps
    _prepare(model)
    key = structure(model)
    if key not in steps:
        if len(steps) >= MAX_STRUCTURES:
            steps.clear()
        fresh = types.FunctionType(_step.__code__.replace(), _step.__globals__, _step.__name__)
        steps[key] = torch.compile(fresh, dynamic=False, options={"guard_filter_fn": _keeps})
    step, config = steps[key], model.config
    if config._attn_implementation != "sdpa":
        return step

    def with_decode_attention(*args: Any) -> torch.Tensor:
        config._attn_implementation = DECODE_ATTENTION  # what the step was traced with
        try:
            return step(*args)
        finally:
            config._attn_implementation = "sdpa"

    return with_decode_attention


@torch.no_grad()
def greedy(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    pad_id: int = 0,
    eos: Collection[int] | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Greedy continuations of a batch of token prompts (left-padded together): at most
    ``max_new_tokens`` each, a row ending at its first ``eos`` id (kept; default: the
    model's, ``()`` for none) or once ``stop(row, new_tokens)`` is true."""
    device = next(model.parameters()).device
    eos = eos_ids(model) if eos is None else set(eos)
    rows, width = len(prompts), max(len(p) for p in prompts)
    context = getattr(model.config, "max_position_embeddings", None) or \
        getattr(model.config, "n_positions", None)  # fmt: skip
    length = cache_length(width + max_new_tokens, context)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.ones(rows, length, dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[r, : width - len(prompt)] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    cache = StaticCache(config=model.config, max_cache_len=length)
    step = _compiled_step(model) if compile else None
    token = _step(model, ids, positions[:, :width], mask, cache)
    new: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for t in range(max_new_tokens):
        for r, value in enumerate(token.tolist()):
            if not done[r]:
                new[r].append(value)
                done[r] = value in eos or (stop is not None and stop(r, new[r]))
        if all(done) or t == max_new_tokens - 1:
            break
        feed, where = token[:, None], positions[:, width + t : width + t + 1]
        if step is not None:
            try:
                token = step(model, feed, where, mask, cache)
            except Exception as error:  # inductor/triton failures share no type
                log.warning("torch.compile failed (%s): decoding without compiling",
                            str(error).strip().splitlines()[0][:200] if str(error).strip()
                            else type(error).__name__)  # fmt: skip
                _compiled[model] = step = None
        if step is None:
            token = _step(model, feed, where, mask, cache)
    return new
