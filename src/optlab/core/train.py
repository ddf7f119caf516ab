"""One training loop on HF Accelerate for every method that fine-tunes a model.

PERP retraining (whole-model and block by block) and unlearning differ only in their loss
and what they train; the loop (AdamW, a linear schedule
stepped once per optimizer step, gradient accumulation, a finite-loss guard, an exact step
budget, a progress bar) is written once here. ``accelerate launch`` runs it on several GPUs.

Under ``accelerate launch`` every process draws the same global batch (same seeds, same
order) and computes on its own rows of it (:func:`local_rows`); DDP averages the gradients,
so N processes take the optimizer steps one process takes with the same global batch.

>>> accelerator = make_accelerator(grad_accum=2, device=model.device)
>>> result = train_loop(accelerator, model, lambda m, step, micro: m(**batch).loss,
...                     TrainConfig(steps=100, lr=1e-5, grad_accum=2))
>>> result["optimizer_steps"]
100
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from optlab.errors import OptlabError

if TYPE_CHECKING:
    from accelerate import Accelerator

# (model, step, micro-batch index) -> the loss of that micro-batch; step counts from 1.
MicroLoss = Callable[[nn.Module, int, int], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """``steps`` optimizer steps, honoured exactly, each of ``grad_accum`` micro-batches;
    the learning rate warms up linearly over ``warmup * steps``, then decays linearly to 0
    (``schedule="linear"``) or stays put (``"constant"``, GREEN-CODE's fine-tuning)."""

    steps: int
    lr: float
    grad_accum: int = 1
    warmup: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "linear"
    desc: str = "train"  # progress bar label and error-message prefix


def make_accelerator(grad_accum: int, device: torch.device | None = None) -> Accelerator:
    """An Accelerator for a model on ``device``: a model the user put on the CPU trains on
    the CPU even where a GPU exists (accelerate would otherwise move it there)."""
    from accelerate import Accelerator  # slow import: only training needs it

    # accelerate.backward() divides the loss by this, so it must be the real accumulation.
    cpu = device is not None and device.type == "cpu"
    return Accelerator(gradient_accumulation_steps=grad_accum, cpu=cpu)


def local_rows(accelerator: Accelerator, size: int) -> range:
    """This process's rows of a global batch of ``size`` rows: a contiguous 1/N share, so the
    N processes together cover the batch one process would see, in the same order.

    >>> local_rows(accelerator, 8)  # process 1 of 2
    range(4, 8)
    """
    world = accelerator.num_processes
    if size % world:
        raise OptlabError(
            f"batch_size {size} is the global batch and must split evenly across {world} "
            f"processes: use a multiple of {world}"
        )
    share = size // world
    return range(accelerator.process_index * share, (accelerator.process_index + 1) * share)


def dropout_active(model: nn.Module) -> bool:
    """Whether a training forward of ``model`` draws random numbers: a dropout module with
    p > 0, or a dropout probability > 0 in its config (most HF families call dropout as a
    function, so their attention and residual dropout are no modules)."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    values = config.to_dict() if hasattr(config, "to_dict") else {}
    return any(
        ("dropout" in key or "pdrop" in key)
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0
        for key, value in values.items()
    )


@contextlib.contextmanager
def seeded_rng(device: torch.device, *key: int) -> Iterator[None]:
    """Draw from generators seeded by ``key`` inside, then restore the outer streams."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # A tuple of ints hashes the same in every process (only str hashing is salted).
        torch.manual_seed(hash(key) & (2**63 - 1))
        yield


def shard_loss(
    rows: range,
    loss_of: Callable[[list[int]], torch.Tensor],
    *,
    rowwise: bool,
    key: tuple[int, ...],
    device: torch.device,
) -> torch.Tensor:
    """The mean loss of this process's ``rows`` of a global batch; ``loss_of(rows)`` computes
    the mean loss of a list of row indices.

    ``rowwise`` (set it when dropout is on): one forward per row, each under generators
    seeded by ``(*key, row)``, so a row's dropout mask depends on the row alone and not on
    how the global batch is split across processes. Otherwise one batched forward.
    """
    if not rowwise:
        return loss_of(list(rows))
    total = torch.zeros((), device=device)
    for row in rows:
        with seeded_rng(device, *key, row):
            total = total + loss_of([row])
    return total / len(rows)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Run a bf16/fp16 model in its dtype while its trainable tensors are fp32 (mixed
    precision: without it, an fp32 norm weight would hand fp32 inputs to bf16 linears)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def linear_schedule(
    optimizer: torch.optim.Optimizer, steps: int, warmup: float, schedule: str = "linear"
) -> Any:
    """Linear warmup over ``warmup * steps``, then linear decay to zero (HF's schedule) or,
    with ``schedule="constant"``, the base rate to the end."""
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, round(warmup * steps))
    if schedule != "linear":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    return get_linear_schedule_with_warmup(optimizer, round(warmup * steps), steps)


def check_finite(loss: torch.Tensor, where: str) -> None:
    """Stop at once on a NaN/inf loss: one step later the weights are NaN too."""
    if not torch.isfinite(loss):
        raise OptlabError(
            f"loss is {loss.item()} at {where}: lower --lr, or check the model for NaN/inf weights"
        )


def train_loop(
    accelerator: Accelerator,
    model: nn.Module,
    micro_loss: MicroLoss,
    config: TrainConfig,
    *,
    dtype: torch.dtype = torch.float32,
    after_step: Callable[[int, float], bool | None] | None = None,
    progress: bool = True,
    train_mode: bool = True,
) -> dict[str, Any]:
    """Train the parameters of ``model`` with ``requires_grad`` for exactly ``config.steps``
    optimizer steps (fewer only if ``after_step(step, mean_loss)`` returns True: an early
    stop that is checked after every step). Returns ``losses`` (one mean per step),
    ``optimizer_steps`` (counted by the optimizer itself) and ``stopped_early``.

    ``micro_loss`` draws its own data from (step, micro): every process should draw the same
    global micro-batch and compute on its :func:`local_rows` (see :func:`shard_loss`).
    ``train_mode=False`` trains in eval mode (no dropout), for regressions onto fixed targets.
    """
    home = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise OptlabError("nothing to train: no parameter requires a gradient")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # Stepped by hand once per optimizer step: a prepared scheduler would step num_processes
    # times per step, as it assumes a sharded dataloader we do not use.
    scheduler = linear_schedule(optimizer, config.steps, config.warmup, config.schedule)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    losses: list[float] = []
    stopped_early = False
    was_training = model.training
    wrapped.train(train_mode)  # dropout on by default, as HF Trainer does
    bar = tqdm(total=config.steps, desc=config.desc, leave=False,
               disable=not progress or not accelerator.is_local_main_process)  # fmt: skip
    try:
        for step in range(1, config.steps + 1):
            total = torch.zeros((), device=accelerator.device)
            for micro in range(config.grad_accum):
                with accelerator.accumulate(wrapped):
                    with autocast(accelerator.device, dtype):
                        loss = micro_loss(wrapped, step, micro)
                    check_finite(loss, f"step {step}")
                    accelerator.backward(loss)
                    optimizer.step()  # a no-op until the last micro-batch of the step
                    optimizer.zero_grad()
                total += loss.detach()
            if not accelerator.sync_gradients:  # the accumulation count drifted: a bug
                raise RuntimeError(f"step {step} ended without an optimizer step")
            scheduler.step()
            mean = accelerator.reduce(total / config.grad_accum, "mean").item()
            losses.append(mean)
            bar.update()
            bar.set_postfix(loss=f"{mean:.4f}")
            if after_step is not None and after_step(step, mean):
                stopped_early = step < config.steps
                break
    finally:
        bar.close()
        model.train(was_training)
    optimizer_steps = max((int(s["step"]) for s in optimizer.state.values()), default=0)
    # Drops the autocast forward a mixed-precision `accelerate launch` patches onto the model.
    accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
    accelerator.free_memory()
    if not hasattr(model, "hf_device_map"):  # a dispatched model stays where accelerate put it
        model.to(home)
    return {"losses": losses, "optimizer_steps": optimizer_steps, "stopped_early": stopped_early}
