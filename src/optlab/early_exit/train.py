"""Multi-exit fine-tuning (GREEN-CODE §1): every allowed exit learns to predict the next token
through the model's own final norm and LM head.

The loss of a window is L = sum_e w_e * CE_e over the exits E (the final layer last), each CE
the mean next-token cross-entropy of exit e's logits (:func:`exit_losses`), with the weights
of :func:`~optlab.early_exit.exits.exit_weights`. Training runs on the shared loop
(:func:`optlab.core.train.train_loop`) with the paper's AdamW settings (lr 1e-5, constant;
weight decay 0.01; windows of 256 packed tokens); ``lora`` trains adapters on every block
linear instead of all weights and merges them back, so the result is a plain HF model.

:func:`exit_agreement` scores exits on held-out windows: top-1 agreement with the final layer
(the quantity an exit policy trades against), next-token CE and accuracy.

>>> config = ExitTrainConfig(steps=2, batch_size=2, context_length=32)
>>> result = train_exits(lm, windows, config, progress=False)
>>> result["optimizer_steps"]
2
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from optlab.core.anatomy import Anatomy
from optlab.core.config import (
    configurable,
    option,
    require,
    require_finite,
    require_positive,
)
from optlab.core.lora import LoraLinear, adapters_of, merge_adapters, wrap_block_linears
from optlab.core.models import LoadedModel
from optlab.core.train import (
    TrainConfig,
    dropout_active,
    local_rows,
    make_accelerator,
    shard_loss,
    train_loop,
)
from optlab.early_exit.exits import WEIGHTS, exit_logits, exit_weights, resolve_exits
from optlab.errors import OptlabError

log = logging.getLogger("optlab")


@configurable("exit-train")
@dataclass(frozen=True)
class ExitTrainConfig:
    """Multi-exit fine-tuning; defaults are the paper's where a CPU run can afford them."""

    exits: str = option("auto", "exit layers: auto (the official rule: every other layer from "
                        "3 in the first half, then every 4th) or a list such as 3,5,7; the "
                        "final layer is always one", metavar="auto|L,L,...")  # fmt: skip
    weights: str = option("geometric", "loss weights: geometric (0.7 / 0.2 / 0.1 shares, "
                          "0.9^k inside a share) or uniform 1/(|E|+1)",
                          choices=WEIGHTS)  # fmt: skip
    steps: int = option(300, "optimizer steps (the paper: 5 epochs of its data)")
    lr: float = option(1e-5, "AdamW learning rate, constant after the warmup (the paper's)")
    weight_decay: float = option(0.01, "AdamW weight decay (the paper's)")
    warmup: float = option(0.0, "linear warmup, a fraction of the steps")
    batch_size: int = option(8, "windows per micro-batch (the paper: 8)")
    grad_accum: int = option(1, "micro-batches per optimizer step (the paper: 16)")
    context_length: int = option(256, "tokens per packed window (the paper: 256)")
    lora: bool = option(False, "train LoRA adapters (--rank, --alpha) on every block linear "
                        "instead of all weights; merged back after training")  # fmt: skip
    rank: int = option(16, "LoRA rank")
    alpha: float = option(32.0, "LoRA alpha")
    eval_windows: int = option(64, "held-out windows scored before and after training (0: none)")
    eval_split: str = option("test", "held-out split scored", choices=("dev", "test"))
    recompute_exits: bool = option(True, "recompute each exit's logits in the backward pass; "
                                   "--no-recompute-exits keeps all |E| x tokens x vocab of "
                                   "them (faster, much more memory)")  # fmt: skip
    seed: int = option(0, "window order and adapters (the command's --seed)", cli=False)

    def __post_init__(self) -> None:
        require_positive(self, "steps", "batch_size", "grad_accum", "context_length", "rank")
        require_finite(self, "lr", "weight_decay", "warmup", "alpha")
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(self.weight_decay >= 0, f"weight_decay must be 0 or more, got "
                f"{self.weight_decay}")  # fmt: skip
        require(0 <= self.warmup < 1, f"warmup is a fraction of the steps in [0, 1), got "
                f"{self.warmup}")  # fmt: skip
        require(isinstance(self.eval_windows, int) and self.eval_windows >= 0,
                f"eval_windows must be a whole number (0 for none), got "
                f"{self.eval_windows!r}")  # fmt: skip
        require(self.weights in WEIGHTS, f"--weights {self.weights!r}: choose one of "
                f"{', '.join(WEIGHTS)}")  # fmt: skip
        resolve_exits(self.exits, 10**6)  # the syntax now; the range once the model is known

    @property
    def windows_needed(self) -> int:
        """Training windows one pass of the step budget reads."""
        return self.steps * self.grad_accum * self.batch_size


def exit_losses(
    model: nn.Module, input_ids: torch.Tensor, exits: Sequence[int], *, recompute: bool = True
) -> torch.Tensor:
    """The mean next-token cross-entropy of each exit on ``input_ids`` [b, t], as a [|E|]
    tensor in the order of ``exits``. One forward of the model gives every exit's state; an
    intermediate exit reads it through the final norm and head (:func:`exit_logits`), under
    activation checkpointing when ``recompute`` (its logits are the biggest tensors here)."""
    anatomy = Anatomy.of(model)
    out = model(input_ids=input_ids, output_hidden_states=True)
    labels = input_ids[:, 1:].reshape(-1)

    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].reshape(labels.numel(), -1).float(), labels)

    def intermediate_ce(hidden: torch.Tensor) -> torch.Tensor:
        return ce(anatomy.logits(hidden))  # what exit_logits does below the final layer

    losses = []
    for layer in exits:
        if layer == len(anatomy.blocks) or not recompute:
            losses.append(ce(exit_logits(anatomy, out.hidden_states, out.logits, layer)))
        else:
            losses.append(checkpoint(intermediate_ce, out.hidden_states[layer],
                                     use_reentrant=False))  # fmt: skip
    return torch.stack(losses)


@torch.no_grad()
def exit_agreement(
    model: nn.Module,
    windows: torch.Tensor,
    exits: Sequence[int],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Per exit (keyed by layer as a string, for JSON) on ``windows`` [n, t]: ``agreement``,
    the share of positions whose top-1 token equals the final layer's; ``ce``, the mean
    next-token cross-entropy; ``accuracy``, the share of next tokens it predicts."""
    anatomy = Anatomy.of(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = {layer: torch.zeros(3, dtype=torch.float64) for layer in exits}
    positions = predicted = 0
    batches = windows.split(batch_size)
    try:
        for batch in tqdm(batches, desc="exit agreement", leave=False, disable=not progress):
            batch = batch.to(device)
            out = model(input_ids=batch, output_hidden_states=True)
            final = out.logits.argmax(-1)
            labels = batch[:, 1:]
            for layer in exits:
                logits = exit_logits(anatomy, out.hidden_states, out.logits, layer)
                top = logits.argmax(-1)
                ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                     reduction="sum")  # fmt: skip
                sums[layer] += torch.tensor([(top == final).sum().item(), ce.item(),
                                             (top[:, :-1] == labels).sum().item()],
                                            dtype=torch.float64)  # fmt: skip
            positions += final.numel()
            predicted += labels.numel()
    finally:
        model.train(was_training)
    return {str(layer): {"agreement": float(s[0] / positions), "ce": float(s[1] / predicted),
                         "accuracy": float(s[2] / predicted)}
            for layer, s in sums.items()}  # fmt: skip


def train_exits(
    lm: LoadedModel,
    windows: torch.Tensor,
    config: ExitTrainConfig | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``lm`` in place on ``windows`` [n, context_length] with the multi-exit loss.

    Micro-batch k of the run reads windows k*b .. k*b+b-1 of an order that visits every
    window once per pass, shuffled anew (seeded) for each pass. Returns the loop's
    ``losses`` (weighted, one per step) and ``optimizer_steps``, the exits and weights,
    ``last_exit_ce`` (per exit, the last step's mean) and the training time.
    """
    config = config or ExitTrainConfig()
    model = lm.model
    num_layers = len(Anatomy.of(model).blocks)
    exits = resolve_exits(config.exits, num_layers)
    weights = exit_weights(exits, num_layers, config.weights)
    if adapters_of(model):
        raise OptlabError("the model already has LoRA adapters: merge them first")
    if len(windows) < 1:
        raise OptlabError("no training windows")
    accelerator = make_accelerator(config.grad_accum, next(model.parameters()).device)
    rows = local_rows(accelerator, config.batch_size)  # fails before the model is touched
    generator = torch.Generator().manual_seed(config.seed)
    passes = -(-config.windows_needed // len(windows))
    order = torch.cat([torch.randperm(len(windows), generator=generator) for _ in range(passes)])
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    model.requires_grad_(not config.lora)
    if config.lora:
        torch.manual_seed(config.seed)  # the adapters' initialisation
        wrap_block_linears(model, lambda linear: LoraLinear(linear, config.rank, config.alpha))
    device = accelerator.device
    weight_vector = torch.tensor(weights, device=device)
    rowwise = dropout_active(model)
    exit_ces: list[torch.Tensor] = []

    def micro_loss(wrapped: nn.Module, step: int, micro: int) -> torch.Tensor:
        start = ((step - 1) * config.grad_accum + micro) * config.batch_size
        batch = windows[order[start : start + config.batch_size]].to(device)

        def loss_of(group: list[int]) -> torch.Tensor:
            per_exit = exit_losses(wrapped, batch[group], exits, recompute=config.recompute_exits)
            exit_ces.append(per_exit.detach().cpu())
            return (weight_vector * per_exit).sum()

        return shard_loss(rows, loss_of, rowwise=rowwise, key=(config.seed, step, micro),
                          device=device)  # fmt: skip

    train = TrainConfig(steps=config.steps, lr=config.lr, grad_accum=config.grad_accum,
                        warmup=config.warmup, weight_decay=config.weight_decay,
                        schedule="constant", desc="exit train")  # fmt: skip
    start = time.perf_counter()
    try:
        result = train_loop(accelerator, model, micro_loss, train, progress=progress)
    finally:
        merge_adapters(model)
        for param in model.parameters():
            param.requires_grad_(requires_grad.get(id(param), True))
        model.eval()
    seconds = time.perf_counter() - start
    per_step = max(1, len(exit_ces) // config.steps)
    last = torch.stack(exit_ces[-per_step:]).mean(0)
    return {**result, "exits": list(exits), "weights": list(weights),
            "last_exit_ce": {str(e): float(v) for e, v in zip(exits, last, strict=True)},
            "train_seconds": seconds, "windows": len(windows),
            "tokens_seen": config.windows_needed * config.context_length}  # fmt: skip
