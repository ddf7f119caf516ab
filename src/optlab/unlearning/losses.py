"""Unlearning objectives: each method is one loss on a forget batch, a retain batch and
(for ``ga_kl_rand``) forget questions paired with random retain answers.

All token losses are means over answer tokens (labels != -100), so neither question tokens
nor padding count; each answer weighs the same in a batch. Signs: a loss is *minimised*, so
gradient ascent on the forget set is ``-CE(forget)``.

==============  ==========================================================================
``ga``          -CE(forget)
``ga_kl_rand``  0.5 * -CE(forget) + CE(random retain answer | forget question)
                + KL(p_orig || p_cur) on retain tokens (Yao et al. 2023; a document has
                no question, so its "random answers" are retain texts on their own)
``graddiff``    -CE(forget) + α CE(retain)
``npo``         -2/β · mean log σ(-β (log π(a|q) - log π_ref(a|q))) + α CE(retain)
                (Zhang et al. 2024, sequence log-likelihoods; open-unlearning's form)
``retain_only`` CE(retain): the oracle, trained without the forget set
==============  ==========================================================================

α is ``retain_weight`` (1 by default, as open-unlearning's ``alpha``); it also weighs the KL
term of ``ga_kl_rand``.

>>> loss, parts = LOSSES.get("graddiff")(LossInputs(model, forget, retain))
>>> parts
{'forget_ce': 2.1, 'retain_ce': 1.7}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from optlab.core.config import Registry
from optlab.unlearning.data import IGNORE, Batch


@dataclass
class LossInputs:
    """What a loss may use; ``reference`` is the frozen model before unlearning."""

    model: nn.Module
    forget: Batch | None  # None only for retain_only
    retain: Batch | None = None
    random: Batch | None = None  # forget questions with random retain answers
    reference: nn.Module | None = None
    beta: float = 1.0  # NPO's inverse temperature
    retain_weight: float = 1.0  # α: the weight of the retain term


LossFunction = Callable[[LossInputs], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Loss:
    """An unlearning objective and the inputs it needs, so the trainer builds exactly those:
    ``needs_reference`` the frozen model before unlearning, ``needs_retain`` retain batches,
    ``uses_forget`` forget batches, ``random_answers`` forget questions paired with K random
    retain answers; ``retain_kl``: its retain term is a mean over retain *tokens* (not over
    examples), so a shard's share of it is weighed by its tokens. ``offered``: listed as a
    method of ``optlab unlearn``."""

    function: LossFunction
    summary: str
    needs_reference: bool = False
    needs_retain: bool = True
    uses_forget: bool = True
    random_answers: bool = False
    retain_kl: bool = False
    offered: bool = True

    def __call__(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, float]]:
        return self.function(inputs)


def token_logprobs(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token and whether it is an answer token, both (B, T-1)."""
    logits = model(**batch.inputs(), use_cache=False).logits[:, :-1].float()
    targets = batch.labels[:, 1:]
    counted = targets != IGNORE
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * counted, counted


def answer_ce(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of each answer (mean over its tokens), averaged over the examples: every
    answer weighs the same whatever its length, as in Yao et al.'s code."""
    logprobs, counted = token_logprobs(model, batch)
    return (-logprobs.sum(-1) / counted.sum(-1).clamp(min=1)).mean()


def sequence_logprob(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed log-probability of each example's answer, (B,)."""
    logprobs, _ = token_logprobs(model, batch)
    return logprobs.sum(-1)


def retain_kl(model: nn.Module, reference: nn.Module, batch: Batch) -> torch.Tensor:
    """KL(p_ref || p_cur) over the vocabulary, per real (non-padding) position, averaged.

    The reference code computed the cross-entropy -Σ p_ref log p_cur (KL plus the constant
    entropy of p_ref) over every position, padding included; this is the KL itself, so it is
    exactly 0 when the models agree.
    """
    with torch.no_grad():
        ref = torch.log_softmax(reference(**batch.inputs(), use_cache=False).logits.float(), -1)
    cur = torch.log_softmax(model(**batch.inputs(), use_cache=False).logits.float(), -1)
    per_position = F.kl_div(cur, ref, log_target=True, reduction="none").sum(-1)
    real = batch.attention_mask.bool()
    return per_position[real].mean()


def ga(x: LossInputs) -> tuple[torch.Tensor, dict[str, float]]:
    forget_ce = answer_ce(x.model, x.forget)
    return -forget_ce, {"forget_ce": forget_ce.item()}


def ga_kl_rand(x: LossInputs) -> tuple[torch.Tensor, dict[str, float]]:
    if x.retain is None or x.random is None or x.reference is None:
        raise ValueError("ga_kl_rand needs retain, random-answer and reference inputs")
    forget_ce = answer_ce(x.model, x.forget)
    random_ce = answer_ce(x.model, x.random)
    kl = retain_kl(x.model, x.reference, x.retain)
    loss = -0.5 * forget_ce + random_ce + x.retain_weight * kl
    return loss, {"forget_ce": forget_ce.item(), "random_ce": random_ce.item(), "kl": kl.item()}


def graddiff(x: LossInputs) -> tuple[torch.Tensor, dict[str, float]]:
    if x.retain is None:
        raise ValueError("graddiff needs retain inputs")
    forget_ce, retain_ce = answer_ce(x.model, x.forget), answer_ce(x.model, x.retain)
    loss = x.retain_weight * retain_ce - forget_ce
    return loss, {"forget_ce": forget_ce.item(), "retain_ce": retain_ce.item()}


def npo(x: LossInputs) -> tuple[torch.Tensor, dict[str, float]]:
    if x.retain is None or x.reference is None:
        raise ValueError("npo needs retain and reference inputs")
    current = sequence_logprob(x.model, x.forget)
    with torch.no_grad():
        reference = sequence_logprob(x.reference, x.forget)
    forget_loss = -2 / x.beta * F.logsigmoid(-x.beta * (current - reference)).mean()
    retain_ce = answer_ce(x.model, x.retain)
    loss = forget_loss + x.retain_weight * retain_ce
    return loss, {"npo": forget_loss.item(), "retain_ce": retain_ce.item()}


def retain_only(x: LossInputs) -> tuple[torch.Tensor, dict[str, float]]:
    if x.retain is None:
        raise ValueError("retain_only needs retain inputs")
    retain_ce = answer_ce(x.model, x.retain)
    return retain_ce, {"retain_ce": retain_ce.item()}


def finetune(x: LossInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain descent on the forget set: teaches it (the book scenario's first stage)."""
    forget_ce = answer_ce(x.model, x.forget)
    return forget_ce, {"forget_ce": forget_ce.item()}


LOSSES: Registry[Loss] = Registry("unlearning method")
"""Every objective by name: what ``UnlearnConfig.method`` names, and what the trainer, the CLI
help and the sweep read (one table: a new loss is one more entry)."""

for _name, _loss in {
    "ga": Loss(ga, "gradient ascent on the forget answers", needs_retain=False),
    "ga_kl_rand": Loss(ga_kl_rand, "0.5 ascent + random retain answers + KL to the original "
                       "on retain", needs_reference=True, random_answers=True, retain_kl=True),
    "graddiff": Loss(graddiff, "ascent on forget + descent on retain"),
    "npo": Loss(npo, "negative preference optimisation (beta 1) + descent on retain",
                needs_reference=True),
    "retain_only": Loss(retain_only, "descent on retain only: the oracle itself",
                        uses_forget=False),
    "finetune": Loss(finetune, "descent on the forget set: teaches it (the book scenario)",
                     needs_retain=False, offered=False),
}.items():  # fmt: skip
    LOSSES.register(_name)(_loss)


def offered_methods() -> list[str]:
    """The methods ``optlab unlearn`` offers (``finetune`` only teaches the book scenario)."""
    return [name for name, loss in LOSSES.items() if loss.offered]
