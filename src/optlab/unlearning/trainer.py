"""Unlearning: one of the losses of :mod:`optlab.unlearning.losses` on the shared training loop.

Defaults follow Yao et al.'s code (AdamW, lr 2e-6, linear decay, no warmup, batch 2); the
step budget is exact and an optional stop on the forget loss is checked after every step
(the reference code's stop could never fire). ``lora=True`` trains rank-32 adapters
(alpha 16) on the query and value projections and merges them at the end, so the result is
a plain Hugging Face model.

>>> result = unlearn(lm, forget, retain, UnlearnConfig(method="graddiff", steps=100))
>>> result.metrics["optimizer_steps"], result.trained[:1]
(100, ['model.embed_tokens.weight'])
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from optlab.core.anatomy import Anatomy, weight_matrix
from optlab.core.config import configurable, option, require, require_finite, require_positive
from optlab.core.grids import GRIDS, round_like
from optlab.core.lora import LoraLinear, adapters_of, merge_adapters
from optlab.core.models import LoadedModel
from optlab.core.modules import replace_module
from optlab.core.train import (
    TrainConfig,
    dropout_active,
    local_rows,
    make_accelerator,
    shard_loss,
    train_loop,
)
from optlab.errors import OptlabError
from optlab.unlearning.data import Batch, Example, encode
from optlab.unlearning.losses import LOSSES, Loss, LossInputs, answer_ce, offered_methods

log = logging.getLogger("optlab")

# Last name part of the query / value projections (fused QKV layers take the adapter whole).
LORA_TARGETS = ("q_proj", "v_proj", "c_attn", "query_key_value", "qkv_proj", "Wqkv")


@configurable("unlearn")
@dataclass(frozen=True)
class UnlearnConfig:
    """How to unlearn. ``steps`` optimizer steps of ``grad_accum`` micro-batches, each with
    ``batch_size`` forget and ``batch_size`` retain examples (the global batch: under
    ``accelerate launch`` with N processes each takes ``batch_size / N`` of them, and N must
    divide it); ``random_answers`` is the K of
    ``ga_kl_rand``; ``retain_weight`` weighs the retain term (graddiff, npo: retain CE;
    ga_kl_rand: its KL); ``stop_forget_ce`` ends training once the forget cross-entropy exceeds it.

    ``saliency`` is SURE (Zhang et al., "Catastrophic Failure of LLM Unlearning via
    Quantization", ICLR 2025, arXiv 2410.16454, section 5): small unlearning updates round
    back to the original weights' grid points when the model is quantized, so the forgotten
    knowledge returns; a larger learning rate moves weights across grid points, and
    restricting the update to the modules most salient for the forget set (the largest
    ||grad of the forget loss|| at the start) keeps that larger step from wrecking utility.
    The paper thresholds each module's gradient norm at a fixed gamma; a share is asked for
    here instead (gamma = the norm of the last module kept), as gradient norms scale with the
    model and the data and a share means the same on every model. Candidates are the weight
    matrices of the decoder blocks (what quantization and pruning touch); the forget loss is
    the forget cross-entropy (NPO's gradient at the start is GA's, up to a constant).
    Chosen first because it needs no knowledge of the quantizer's grid (any bit width, RTN or
    GPTQ) and is the method the finding's authors propose and measure.

    ``quant_aware`` is the other answer, for a known deployment format: quantization-aware
    training (the straight-through estimator, Bengio et al. 2013, arXiv 1308.3432; Jacob et
    al. 2018, arXiv 1712.05877) applied to unlearning. Every block linear is first rounded to
    GGUF type T's grid; the trained ones then enter every forward pass as their T rounding,
    with the gradient passed straight through to the float weights, and are left rounded at
    the end. The loss is therefore computed on exactly the weights a T file holds, and a
    model whose weights lie on T's grid is written to T without change: the forgetting
    cannot round away (SURE's larger steps did not outlive Q4_1 on the default model, whose
    weights sit on that grid; see BENCHMARKS.md). Other grids are an attack to measure.

    ``seed`` defaults to 0, the seed ``optlab unlearn --seed`` has always defaulted to (and
    every other command's), not Yao et al.'s 8888: a seed is no hyperparameter, and the runs
    users made from the CLI stay reproducible with their defaults.

    >>> UnlearnConfig(method="npo", lora=True, lr=1e-4, steps=50).method
    'npo'
    """

    method: str = option("ga_kl_rand", "the loss: " + ", ".join(offered_methods()))
    steps: int = option(1000, "optimizer steps")
    lr: float = option(2e-6, "AdamW learning rate")
    batch_size: int = option(2, "examples per set")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    warmup: float = option(0.0, "linear warmup, a fraction of the steps")
    lora: bool = option(False, "LoRA (--rank, --alpha) on the query/value projections; merged")
    rank: int = option(32, "LoRA rank")
    alpha: float = option(16.0, "LoRA alpha")
    random_answers: int = option(5, "ga_kl_rand: random retain answers per forget question")
    beta: float = option(1.0, "NPO beta")
    retain_weight: float = option(1.0, "retain term weight: graddiff/npo CE, ga_kl_rand KL")
    stop_forget_ce: float | None = option(None, "stop once forget CE exceeds this")
    saliency: float | None = option(None, "SURE: train only this share of the block linears, "
                                    "those with the largest forget-loss gradient norm (pair "
                                    "with a larger --lr)", metavar="SHARE")  # fmt: skip
    quant_aware: str | None = option(None, "unlearn on the weights as GGUF type T stores them "
                                     "(straight-through); the saved block linears lie on T's "
                                     "grid, so a T file keeps the forgetting",
                                     metavar="T", choices=GRIDS)  # fmt: skip
    max_length: int = option(256, "tokens per example (longer ones keep their start)")
    seed: int = option(0, "data order, random answers, adapters (the command's --seed)",
                       cli=False)  # fmt: skip

    def __post_init__(self) -> None:
        LOSSES.get(self.method)  # did-you-mean on a typo
        require_positive(self, "steps", "batch_size", "grad_accum", "rank", "random_answers",
                         "max_length")  # fmt: skip
        require_finite(self, "lr", "warmup", "alpha", "beta", "retain_weight", "stop_forget_ce")
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(self.beta > 0, f"beta must be positive, got {self.beta}")
        require(self.retain_weight >= 0, f"retain_weight must be 0 or more, got "
                f"{self.retain_weight}")  # fmt: skip
        require(0 <= self.warmup < 1, f"warmup is a fraction of the steps in [0, 1), got "
                f"{self.warmup}")  # fmt: skip
        if self.saliency is not None:
            require_finite(self, "saliency")
            require(0 < self.saliency <= 1, f"saliency is a share of the block linears in "
                    f"(0, 1], got {self.saliency}")  # fmt: skip
            require(not self.lora, "--saliency picks whole weight matrices to train; it does "
                    "not combine with --lora")  # fmt: skip
        if self.quant_aware is not None:
            require(self.quant_aware in GRIDS, f"quant_aware is a GGUF type of "
                    f"{', '.join(GRIDS)}, got {self.quant_aware!r}")  # fmt: skip
            require(not self.lora, "--quant-aware rounds the weights themselves; it does not "
                    "combine with --lora")  # fmt: skip

    @property
    def loss(self) -> Loss:
        return LOSSES.get(self.method)


@configurable("unlearn-teach")
@dataclass(frozen=True)
class TeachConfig:
    """How a scenario that must first be learnt (``book``) is taught: LoRA fine-tuning on the
    forget set, merged (or, with ``full``, fine-tuning of every weight), before the oracle is
    copied and unlearning starts.

    On the default model (SmolLM2-135M, book seed 1, 15 taught passages of 64 tokens) the
    LoRA default leaves memorisation near the untaught level (ROUGE-L of the greedy
    continuation 0.07 untaught, about 0.09 taught); ``full`` at lr 1e-4 for the 100 steps
    reaches ROUGE-L 0.92 (exact match 0.92) on the taught passages and 0.10 on the held-out
    ones. The defaults stay LoRA, so runs made before replay unchanged.

    ``quant_aware`` matters to a quantization audit of such a model: the default model's
    weights lie on the Q4_1 grid, and teaching steps smaller than half a grid step round back,
    so the taught model's own Q4_1 file has forgotten the passages before any unlearning
    (measured: ROUGE-L 0.92 -> 0.06). Taught through Q4_1 (``quant_aware="q4_1"``), the
    passages live in what that file keeps, but the straight-through steps must cross grid
    points: ``full`` for 100 steps reached ROUGE-L 0.06 at lr 1e-4, 0.25 at 3e-4 and 0.79 at
    1e-3 (wiki:eval perplexity 22.7 -> 43.8 at 1e-3)."""

    steps: int = option(100, "book: LoRA steps that teach the passages first",
                        flag="--teach-steps")  # fmt: skip
    lr: float = option(1e-3, "book: teaching lr", flag="--teach-lr")
    full: bool = option(False, "book: teach by full fine-tuning, not LoRA on q/v (with "
                        "--teach-lr 1e-4 it memorises)", flag="--teach-full")  # fmt: skip
    quant_aware: str | None = option(None, "book: teach on the weights as GGUF type T stores "
                                     "them (with --teach-full), so that T's file of the "
                                     "taught model keeps the passages",
                                     flag="--teach-quant-aware", metavar="T",
                                     choices=GRIDS)  # fmt: skip

    def __post_init__(self) -> None:
        require_positive(self, "steps")
        require_finite(self, "lr")
        require(self.lr > 0, f"the teaching lr must be positive, got {self.lr}")
        if self.quant_aware is not None:
            require(self.quant_aware in GRIDS, f"--teach-quant-aware is a GGUF type of "
                    f"{', '.join(GRIDS)}, got {self.quant_aware!r}")  # fmt: skip
            require(self.full, "--teach-quant-aware rounds the weights themselves: give "
                    "--teach-full too (LoRA adapters are not on a grid)")  # fmt: skip

    def training(self) -> UnlearnConfig:
        # Seed 0 whatever the run's seed: the teaching stage is the same for every run of a
        # scenario split, as it always was (a sweep's seeds vary the split and the unlearning).
        return UnlearnConfig(method="finetune", lora=not self.full, lr=self.lr,
                             steps=self.steps, seed=0, quant_aware=self.quant_aware)  # fmt: skip


@dataclass
class UnlearnResult:
    """Training metrics, and the names of the parameters that changed (for the distance to
    the oracle: the adapted weights with LoRA, every parameter otherwise)."""

    metrics: dict[str, Any]
    trained: list[str]


def _qv_projections(model: nn.Module) -> dict[str, nn.Module]:
    anatomy = Anatomy.of(model)
    found = {}
    for index, block in enumerate(anatomy.blocks):
        for name, linear in anatomy.linears(block).items():
            if name.rsplit(".", 1)[-1] in LORA_TARGETS:
                found[f"{anatomy.blocks_path}.{index}.{name}"] = linear
    if not found:
        raise OptlabError(f"no query/value projection found for LoRA in {anatomy.family}")
    return found


def trained_names(model: nn.Module, lora: bool) -> list[str]:
    """The parameters an unlearning run changes: the adapted q/v weights with LoRA (after the
    merge), every parameter otherwise."""
    if lora:
        return [f"{name}.weight" for name in _qv_projections(model)]
    return [name for name, _ in model.named_parameters()]


def add_qv_adapters(model: nn.Module, rank: int, alpha: float) -> list[str]:
    """Plain LoRA on every query / value projection; returns the adapted weights' names."""
    for name, linear in _qv_projections(model).items():
        replace_module(model, name, LoraLinear(linear, rank, alpha))
    return [f"{name}.weight" for name in adapters_of(model)]  # their names once merged


def block_linear_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every decoder-block weight matrix by parameter name (what quantization and pruning
    change, and what SURE chooses from)."""
    anatomy = Anatomy.of(model)
    return {f"{anatomy.blocks_path}.{index}.{name}.weight": linear.weight
            for index, block in enumerate(anatomy.blocks)
            for name, linear in anatomy.linears(block).items()}  # fmt: skip


class _RoundThrough(torch.autograd.Function):
    """Forward: exactly the GGUF rounding (w + (r - w).detach() is r only up to float error).
    Backward: the gradient passed to the float weight unchanged (straight-through)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, grid: str) -> torch.Tensor:
        return round_like(weight, grid)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


@dataclass
class _Gridded:
    """A weight on a GGUF grid under --quant-aware: its module and type."""

    module: nn.Module
    grid: str
    carried: bool = False  # trained through the rounding (a parametrization until baked)

    @property
    def transposed(self) -> bool:
        """GPT-2's Conv1D stores (in, out): rounded as (out, in), GGUF's layout."""
        return isinstance(self.module, Conv1D)

    def matrix(self) -> torch.Tensor:
        """The (rows, columns) view GGUF blocks run along, sharing the weight's storage."""
        if isinstance(self.module, nn.Embedding):
            return self.module.weight.data
        return weight_matrix(self.module)


class _StraightThrough(nn.Module):
    """A weight seen as its GGUF rounding, trained straight through. ``transposed``: GPT-2's
    Conv1D stores (in, out); GGUF blocks run along the input, so it is rounded as (out, in)."""

    def __init__(self, grid: str, transposed: bool) -> None:
        super().__init__()
        self.grid, self.transposed = grid, transposed

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return _RoundThrough.apply(weight.t(), self.grid).t()
        return _RoundThrough.apply(weight, self.grid)


# --quant-aware: the type of the token embeddings and the head, as `optlab export` writes them.
EMBED_GRID = "q8_0"


def grid_modules(model: nn.Module, grid: str, flag: str = "--quant-aware") -> list[_Gridded]:
    """The modules a GGUF file of type ``grid`` quantizes, each with its type (block linears
    ``grid``, embeddings and head Q8_0, as ``optlab export --type grid`` writes them).
    Raises OptlabError if a row is not whole GGUF blocks; cheap, so a run checks it first."""
    found = {name.rpartition(".")[0]: grid for name in block_linear_weights(model)}
    tables = (model.get_input_embeddings(), model.get_output_embeddings())
    for name, module in model.named_modules():  # tables already among the linears keep grid
        if any(module is table for table in tables):
            found.setdefault(name, EMBED_GRID)
    gridded = []
    for name, kind in found.items():
        item = _Gridded(model.get_submodule(name), kind)
        if item.matrix().shape[-1] % 32:
            raise OptlabError(f"{flag} {grid}: {name} has rows of "
                              f"{item.matrix().shape[-1]}, not a multiple of 32 (GGUF "
                              "blocks)")  # fmt: skip
        gridded.append(item)
    return gridded


def grid_weights(model: nn.Module, grid: str, trained: set[str]) -> list[_Gridded]:
    """``quant_aware``: the weights of :func:`grid_modules` rounded in place to their types,
    and the trained ones seen through that rounding (straight-through) until
    :func:`bake_grid`."""
    gridded = grid_modules(model, grid)
    trained_ids = {id(p) for name, p in model.named_parameters() if name in trained}
    with torch.no_grad():
        for item in gridded:
            item.matrix().copy_(round_like(item.matrix(), item.grid))
    for item in gridded:  # tied embeddings and head: both see the same rounded table
        if id(item.module.weight) in trained_ids and item.module.weight.requires_grad:
            through = _StraightThrough(item.grid, item.transposed)
            parametrize.register_parametrization(item.module, "weight", through)
            item.carried = True
    return gridded


def bake_grid(gridded: list[_Gridded]) -> None:
    """The trained weights left on their grid (the float weights rounded once more: exactly
    what the loss saw), the parametrizations removed and tied tables still tied."""
    for item in gridded:
        if item.carried:
            parametrize.remove_parametrizations(item.module, "weight", leave_parametrized=False)
    with torch.no_grad():
        for item in gridded:
            item.matrix().copy_(round_like(item.matrix(), item.grid))


def salient_weights(
    model: nn.Module,
    tokenizer: Any,
    forget: list[Example],
    share: float,
    max_length: int = 256,
    batch_size: int = 8,
) -> tuple[list[str], dict[str, float]]:
    """SURE's module saliency: the L2 norm of the gradient of the forget cross-entropy (its
    mean over the whole forget set) with respect to each block weight matrix, at the model
    as it is; returns the ``share`` of them with the largest norms (at least one; ties keep
    the model's order) and every norm. The model's gradients and ``requires_grad`` flags are
    left as they were."""
    weights = block_linear_weights(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for weight in weights.values():
        weight.requires_grad_(True)
        weight.grad = None
    device = next(model.parameters()).device
    try:
        for start in range(0, len(forget), batch_size):
            chunk = forget[start : start + batch_size]
            batch = encode(tokenizer, chunk, max_length).to(device)
            (answer_ce(model, batch) * len(chunk) / len(forget)).backward()
        norms = {name: float(w.grad.norm()) if w.grad is not None else 0.0
                 for name, w in weights.items()}  # fmt: skip
    finally:
        for param in model.parameters():
            param.grad = None
            param.requires_grad_(flags[id(param)])
    keep = max(1, round(share * len(norms)))
    ranked = sorted(norms, key=lambda name: -norms[name])  # stable: ties in model order
    return ranked[:keep], norms


class _Sampler:
    """Seeded epochs over a list: every example is seen once before any repeats."""

    def __init__(self, items: list[Example], seed: int) -> None:
        self.items, self.rng, self.order = items, random.Random(seed), []

    def take(self, n: int) -> list[Example]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = list(range(len(self.items)))
                self.rng.shuffle(self.order)
            out.append(self.items[self.order.pop()])
        return out


def unlearn(
    lm: LoadedModel,
    forget: list[Example],
    retain: list[Example] | None,
    config: UnlearnConfig | None = None,
    *,
    progress: bool = True,
) -> UnlearnResult:
    """Unlearn ``forget`` from ``lm`` in place (``retain_only`` trains the oracle instead).

    >>> result = unlearn(lm, forget, retain, UnlearnConfig(method="ga", steps=20))
    """
    config = config or UnlearnConfig()
    model, tokenizer = lm.model, lm.tokenizer
    objective = config.loss
    if not forget and objective.uses_forget:
        raise OptlabError("the forget set is empty")
    needs_retain = objective.needs_retain
    if needs_retain and not retain:
        raise OptlabError(f"method {config.method!r} needs a retain set")
    if adapters_of(model):
        raise OptlabError("the model already has LoRA adapters: merge them first")
    torch.manual_seed(config.seed)
    accelerator = make_accelerator(config.grad_accum, next(model.parameters()).device)
    rows = local_rows(accelerator, config.batch_size)  # fails before the model is touched
    reference = None
    if objective.needs_reference:  # the frozen model before unlearning
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    trained = trained_names(model, config.lora)
    saliency: dict[str, Any] = {}
    if config.saliency is not None and forget:  # SURE: only the salient weights train
        trained, norms = salient_weights(model, tokenizer, forget, config.saliency,
                                         config.max_length)  # fmt: skip
        saliency = {"salient": trained, "saliency_gamma": norms[trained[-1]],
                    "saliency_candidates": len(norms)}  # fmt: skip
    model.requires_grad_(not config.lora and not saliency)
    if saliency:
        for name, param in model.named_parameters():
            param.requires_grad_(name in trained)
    if config.lora:
        add_qv_adapters(model, config.rank, config.alpha)
    on_grid = grid_weights(model, config.quant_aware, set(trained)) if config.quant_aware else []
    carried = any(item.carried for item in on_grid)
    if reference is not None:  # accelerate may move the trained model to its own device
        reference.to(accelerator.device)
    # Every process draws the same global batch from the same streams and trains on its
    # local_rows of it, so N processes see what one process sees (random answers included).
    forget_draw = _Sampler(forget, config.seed * 1000)
    retain_draw = _Sampler(retain or [], config.seed * 1000 + 500)
    answers = _Sampler(retain or [], config.seed * 1000 + 900)
    size = config.batch_size
    rowwise = dropout_active(model)
    device = accelerator.device
    parts: list[dict[str, float]] = []

    def batch(examples: list[Example]) -> Batch:
        return encode(tokenizer, examples, config.max_length).to(device)

    def micro_loss(wrapped: nn.Module, step: int, micro: int) -> torch.Tensor:
        forget_examples = forget_draw.take(size) if forget and objective.uses_forget else []
        retain_examples = retain_draw.take(size) if needs_retain else []
        random_answers = [answers.take(config.random_answers) for _ in forget_examples
                          ] if objective.random_answers else []  # fmt: skip
        # The retain tokens the KL averages over in the whole global batch.
        kl_tokens = int(encode(tokenizer, retain_examples, config.max_length).attention_mask
                        .sum()) if objective.retain_kl else 0  # fmt: skip
        values: list[dict[str, float]] = []

        def loss_of(group: list[int]) -> torch.Tensor:
            chosen = [forget_examples[i] for i in group] if forget_examples else []
            inputs = LossInputs(wrapped, batch(chosen) if chosen else None, reference=reference,
                                beta=config.beta, retain_weight=config.retain_weight)  # fmt: skip
            if needs_retain:
                inputs.retain = batch([retain_examples[i] for i in group])
            if objective.random_answers:
                inputs.random = batch([Example(a.answer, forget_examples[i].question)
                                       for i in group for a in random_answers[i]])  # fmt: skip
            if objective.retain_kl:
                # The KL is a mean over the retain tokens of the batch it is given, the other
                # terms means over examples: weigh this group's KL by its share of the global
                # batch's tokens, so the mean over equal groups is the global batch's KL.
                share = size * int(inputs.retain.attention_mask.sum()) / (len(group) * kl_tokens)
                inputs.retain_weight *= share
            value, part = objective(inputs)
            values.append(part)
            return value

        # --quant-aware: each weight rounded once a micro-batch, not once a forward pass.
        with parametrize.cached() if carried else contextlib.nullcontext():
            loss = shard_loss(rows, loss_of, rowwise=rowwise, key=(config.seed, step, micro),
                              device=device)  # fmt: skip
        parts.append({k: sum(v[k] for v in values) / len(values) for k in values[0]})
        return loss

    def stop(step: int, loss: float) -> bool:
        ce = parts[-1].get("forget_ce") if parts else None
        if config.stop_forget_ce is None or ce is None:
            return False
        # Every process must take the same decision, or one waits forever for the others.
        ce = accelerator.reduce(torch.tensor(ce, device=device), "mean").item()
        return ce > config.stop_forget_ce

    train = TrainConfig(steps=config.steps, lr=config.lr, grad_accum=config.grad_accum,
                        warmup=config.warmup, desc=f"unlearn {config.method}")  # fmt: skip
    start = time.perf_counter()
    try:
        result = train_loop(accelerator, model, micro_loss, train, after_step=stop,
                            progress=progress)  # fmt: skip
    finally:
        merge_adapters(model)
        bake_grid(on_grid)  # the rounded weights the loss saw become the weights
        for param in model.parameters():
            param.requires_grad_(requires_grad.get(id(param), True))
        model.eval()
    seconds = time.perf_counter() - start
    last = {k: sum(p[k] for p in parts[-config.grad_accum :]) / config.grad_accum
            for k in (parts[-1] if parts else {})}  # fmt: skip
    metrics = {
        "method": config.method,
        "lora": config.lora,
        **result,
        "final_parts": last,
        "train_seconds": seconds,
        "trained_tensors": len(trained),
        **saliency,
    }
    return UnlearnResult(metrics, trained)
