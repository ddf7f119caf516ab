"""Contrastive fine-tuning of a PromptEOL embedder (Jiang et al. 2023, section 3 of the spec).

Each triplet (sentence, positive, hard negative) is wrapped in the template without a
demonstration, its sentences cut to their first 32 tokens; z1, z2, z3 are the last token's
last-layer states. The loss is InfoNCE at temperature 0.05: row i's logits are
cos(z1_i, z2_j) for every j of the global batch, then cos(z1_i, z3_j) for every j (the hard
negatives as extra negatives), and the target is j = i. LoRA (r 64, alpha 16, dropout 0.05)
trains on every linear of the decoder blocks (not the embeddings, not the LM head), lr 5e-4,
linear warmup and decay, seed 42, on the shared loop (:mod:`optlab.core.train`). The dev
Spearman is measured every ``eval_every`` steps and the best step's adapters are merged, so
the result is a plain Hugging Face model.

Under ``accelerate launch`` each process embeds its rows of the global batch and gathers
z2, z3 from all processes *with* gradients (:func:`gather`),
so every row's negatives are the whole global batch, as on one process; the loss of a
process is the mean over its rows, and DDP's gradient average is the gradient of the global
batch's mean loss.

>>> result = train_contrastive(lm, triplets, dev_pairs, ContrastiveConfig(steps=100))
>>> result["optimizer_steps"], result["best_step"] in (50, 100)
(100, True)
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from optlab.core.config import configurable, option, require, require_finite, require_positive
from optlab.core.lora import LoraLinear, adapters_of, merge_adapters, wrap_block_linears
from optlab.core.models import LoadedModel
from optlab.core.train import TrainConfig, local_rows, make_accelerator, train_loop
from optlab.embed.prompteol import Embedder, PromptEOLConfig, left_padded
from optlab.embed.sts import sts_spearman
from optlab.embed.triplets import Triplet
from optlab.errors import OptlabError

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("optlab")
PAPER_WARMUP = 100  # steps, of about one epoch of NLI (~1000 steps at batch 256)


@configurable("embed-contrastive")
@dataclass(frozen=True)
class ContrastiveConfig:
    """How to fine-tune (the paper's values but the step budget and batch, which a CPU
    cannot afford: the paper trains one epoch of NLI, batch 256, 100 warmup steps).

    >>> ContrastiveConfig(steps=300).warmup_steps   # the paper's 100 capped at a tenth
    30
    """

    steps: int = option(200, "optimizer steps")
    batch_size: int = option(32, "triplets per micro-batch: the global batch, every row's "
                             "in-batch negatives (the paper: 256)")  # fmt: skip
    grad_accum: int = option(1, "micro-batches per optimizer step (negatives stay in-batch)")
    lr: float = option(5e-4, "AdamW learning rate")
    warmup: int | None = option(None, "linear warmup steps; default: the paper's 100, capped "
                                "at a tenth of --steps")  # fmt: skip
    temperature: float = option(0.05, "InfoNCE temperature")
    rank: int = option(64, "LoRA rank (the paper: 64; smaller is cheaper)")
    alpha: float = option(16.0, "LoRA alpha")
    dropout: float = option(0.05, "LoRA dropout", flag="--lora-dropout")
    max_tokens: int = option(32, "tokens kept of each sentence (the start)")
    eval_every: int = option(50, "dev Spearman every N steps and at the last; the best "
                             "step's adapters are kept")  # fmt: skip
    seed: int = option(42, "data order and adapters (the command's --seed)", cli=False)

    def __post_init__(self) -> None:
        require_positive(self, "steps", "batch_size", "grad_accum", "rank", "max_tokens",
                         "eval_every")  # fmt: skip
        require_finite(self, "lr", "temperature", "alpha", "dropout")
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(self.temperature > 0, f"temperature must be positive, got {self.temperature}")
        require(0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1), got {self.dropout}")
        require(self.warmup is None or 0 <= self.warmup < self.steps,
                f"warmup must be 0 to steps - 1 ({self.steps - 1}), got {self.warmup}")  # fmt: skip

    @property
    def warmup_steps(self) -> int:
        return min(PAPER_WARMUP, self.steps // 10) if self.warmup is None else self.warmup


def info_nce(
    z1: torch.Tensor,
    z2: torch.Tensor,
    z3: torch.Tensor,
    temperature: float = 0.05,
    offset: int = 0,
) -> torch.Tensor:
    """Mean InfoNCE of the rows of ``z1`` against all positives ``z2`` and hard negatives
    ``z3`` (cosine similarities over ``temperature``); row i's target is ``z2[offset + i]``
    (``offset``: where this process's rows start in the gathered batch).

    >>> z = torch.eye(3)
    >>> round(info_nce(z, z, -z, temperature=1.0).item(), 4)  # -log(e / (e + 4 + 1/e))
    0.9581
    """
    anchors = F.normalize(z1, dim=-1)
    logits = torch.cat([anchors @ F.normalize(z2, dim=-1).T,
                        anchors @ F.normalize(z3, dim=-1).T], dim=1) / temperature  # fmt: skip
    target = torch.arange(len(z1), device=z1.device) + offset
    return F.cross_entropy(logits, target)


class _Gather(torch.autograd.Function):
    """all_gather whose backward hands each process the summed gradient of its own rows.

    The operation of ``torch.distributed.nn.functional.all_gather``, which torch 2.13
    deprecates (a FutureWarning at every call; its replacement is private): the backward is
    an all-reduce of the whole gradient (every backend has one, gloo included) and a slice.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, dim: int) -> torch.Tensor:
        import torch.distributed as dist

        z = z.contiguous()
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z)
        ctx.dim, ctx.rank, ctx.size = dim, dist.get_rank(), z.shape[dim]
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)  # every process's loss depends on every process's rows
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None


def gather(accelerator: Accelerator, z: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every process's ``z`` concatenated along ``dim`` in process order, differentiable
    (gradients flow back to the process that computed each row); ``z`` on one process."""
    if accelerator.num_processes == 1:
        return z
    return _Gather.apply(z, dim)


def _batches(n: int, size: int, seed: int) -> Iterator[list[int]]:
    """Seeded epochs over ``n`` items, ``size`` at a time (every item once before repeats)."""
    rng, order = random.Random(seed), []
    while True:
        while len(order) < size:
            epoch = list(range(n))
            rng.shuffle(epoch)
            order += epoch
        yield order[:size]
        del order[:size]


def _prompt_ids(lm: LoadedModel, texts: list[str], max_tokens: int) -> dict[str, list[int]]:
    """Token ids of each text's prompt (no demonstration), the text cut to ``max_tokens``."""
    tokenizer, prompt = lm.tokenizer, PromptEOLConfig()
    pieces = tokenizer(texts, add_special_tokens=False)["input_ids"]
    cut = [t if len(p) <= max_tokens else tokenizer.decode(p[:max_tokens])
           for t, p in zip(texts, pieces, strict=True)]  # fmt: skip
    ids = tokenizer([prompt.prompt(t) for t in cut])["input_ids"]
    return dict(zip(texts, ids, strict=True))


def train_contrastive(
    lm: LoadedModel,
    triplets: list[Triplet],
    dev: list[tuple[str, str, float]],
    config: ContrastiveConfig | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``lm`` in place on ``triplets``; the adapters of the step with the best
    Spearman on ``dev`` (text, text, score) are merged. Returns the training metrics."""
    config = config or ContrastiveConfig()
    model = lm.model
    if not triplets:
        raise OptlabError("no training triplets")
    if adapters_of(model):
        raise OptlabError("the model already has LoRA adapters: merge them first")
    torch.manual_seed(config.seed)  # the adapters' initialisation, LoRA dropout
    accelerator = make_accelerator(config.grad_accum, lm.device)
    rows = local_rows(accelerator, config.batch_size)  # a batch that does not split fails now
    ids = _prompt_ids(lm, sorted({t for triplet in triplets for t in triplet}), config.max_tokens)
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    adapters = wrap_block_linears(model, lambda linear: LoraLinear(
        linear, config.rank, config.alpha, config.dropout))  # fmt: skip
    embedder = Embedder(lm, PromptEOLConfig())
    draw = _batches(len(triplets), config.batch_size, config.seed)
    pad, device = lm.tokenizer.pad_token_id, accelerator.device

    def micro_loss(wrapped: nn.Module, step: int, micro: int) -> torch.Tensor:
        batch = next(draw)  # every process draws the same global batch
        local = [triplets[batch[i]] for i in rows]
        texts = [triplet[k] for k in range(3) for triplet in local]
        out = wrapped(**left_padded([ids[t] for t in texts], pad, device), use_cache=False,
                      output_hidden_states=True, logits_to_keep=1)  # fmt: skip
        z1, z2, z3 = out.hidden_states[-1][:, -1].float().split(len(local))
        # One collective for both (the order of two would be up to each process's autograd).
        positives, negatives = gather(accelerator, torch.stack([z2, z3]), dim=1)
        return info_nce(z1, positives, negatives, config.temperature, offset=rows.start)

    def dev_spearman() -> float:
        model.eval()  # no dropout while measuring
        value = sts_spearman(partial(embedder.encode, show_progress_bar=False), dev)
        model.train()
        return value if math.isfinite(value) else -math.inf  # a constant embedding: nan

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"step": None, "spearman": -math.inf, "adapters": None}
    before = dev_spearman()

    def after_step(step: int, loss: float) -> bool:
        if step % config.eval_every and step != config.steps:
            return False
        value = dev_spearman()
        history.append({"step": step, "loss": loss, "dev_spearman": value})
        log.info("step %d: loss %.4f, dev Spearman x100 %.2f", step, loss, value)
        if best["step"] is None or value > best["spearman"]:
            best.update(step=step, spearman=value, adapters={
                name: (a.lora_A.detach().clone(), a.lora_B.detach().clone())
                for name, a in adapters.items()})  # fmt: skip
        return False

    train = TrainConfig(steps=config.steps, lr=config.lr, grad_accum=config.grad_accum,
                        warmup=config.warmup_steps / config.steps, desc="embed train")  # fmt: skip
    dtype = next(model.parameters()).dtype
    start = time.perf_counter()
    try:
        result = train_loop(accelerator, model, micro_loss, train, dtype=dtype,
                            after_step=after_step, progress=progress)  # fmt: skip
        with torch.no_grad():  # back to the best step's adapters before the merge
            for name, (a, b) in best["adapters"].items():
                adapters[name].lora_A.copy_(a)
                adapters[name].lora_B.copy_(b)
    finally:
        merge_adapters(model)
        for param in model.parameters():
            param.requires_grad_(requires_grad.get(id(param), True))
        model.eval()
    return {
        **result,
        "train_seconds": time.perf_counter() - start,
        "triplets": len(triplets),
        "dev_pairs": len(dev),
        "dev_spearman_before": before,
        "dev_history": history,
        "best_step": best["step"],
        "dev_spearman": best["spearman"],
        "adapted_linears": len(adapters),
        "warmup_steps": config.warmup_steps,
    }
