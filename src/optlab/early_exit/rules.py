"""Exit rules for generation: all layers, a fixed exit, a confidence threshold, a policy.

Each implements :class:`~optlab.early_exit.exits.ExitRule`; the decoder consults it at the
allowed exits below the final layer, in order, and stops the token at the first ``True``.
:func:`exit_rule` turns the command line's ``--exit`` into a rule and the exits it is
consulted at.

>>> lm = load_model("tiny:llama")
>>> rule, exits = exit_rule("fixed:1", lm, "auto", 0.9)
>>> exits, rule.should_exit(1, torch.zeros(64))
((1, 2), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from optlab.core.anatomy import Anatomy
from optlab.core.models import LoadedModel
from optlab.early_exit.exits import ExitRule, resolve_exits
from optlab.errors import OptlabError

RULES = ("none", "fixed:L", "confidence", "policy")


class ExitHead:
    """The exit path's logits of one token's state, remembered for the last state asked: a
    confidence rule and the decoder read the same exit's logits, computed once (the head of
    a small model costs several blocks)."""

    def __init__(self, anatomy: Anatomy) -> None:
        self.anatomy = anatomy
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not hidden:
            self._last = (hidden, self.anatomy.logits(hidden))
        return self._last[1]


class NoExit:
    """Every token runs all layers (the baseline)."""

    def should_exit(self, layer: int, hidden: torch.Tensor) -> bool:
        return False


class FixedExit:
    """Every token stops after ``layer`` blocks."""

    def __init__(self, layer: int) -> None:
        self.layer = layer

    def should_exit(self, layer: int, hidden: torch.Tensor) -> bool:
        return layer >= self.layer


class ConfidenceExit:
    """CALM's training-free softmax rule: stop where the exit's top probability >= tau."""

    def __init__(self, head: ExitHead, tau: float) -> None:
        self.head, self.tau = head, tau

    def should_exit(self, layer: int, hidden: torch.Tensor) -> bool:
        probs = torch.softmax(self.head(hidden).float(), dim=-1)
        return bool(probs.max() >= self.tau)


def require_tau(tau: float) -> None:
    if not 0.0 < tau < 1.0:
        raise OptlabError(f"--tau must be in (0, 1), got {tau!r}")


def exit_rule(
    spec: str,
    lm: LoadedModel,
    exits: str | Sequence[int],
    tau: float,
    *,
    head: ExitHead | None = None,
    policy: str | Path | None = None,
) -> tuple[ExitRule, tuple[int, ...]]:
    """The rule ``--exit`` names and the exits (ascending, ending with the final layer) it
    is consulted at. ``fixed:L`` exits at L whatever ``exits`` says; ``policy`` loads the
    PPO policy of the run ``policy`` (``optlab exit policy``) for these exits and ``tau``."""
    num_layers = len(Anatomy.of(lm.model).blocks)
    require_tau(tau)
    allowed = resolve_exits(exits, num_layers)
    if spec == "none":
        return NoExit(), allowed
    if spec.startswith("fixed:"):
        try:
            layer = int(spec.removeprefix("fixed:"))
        except ValueError:
            raise OptlabError(f"--exit {spec!r}: give fixed:L, e.g. fixed:3") from None
        return FixedExit(layer), resolve_exits([layer], num_layers)
    if spec == "confidence":
        return ConfidenceExit(head or ExitHead(Anatomy.of(lm.model)), tau), allowed
    if spec == "policy":
        if policy is None:
            raise OptlabError("--exit policy needs --policy DIR (a run of `optlab exit policy`)")
        from optlab.early_exit.policy import load_policy  # gymnasium only when asked

        return load_policy(policy, lm, allowed, tau), allowed
    raise OptlabError(f"--exit {spec!r}: choose none, fixed:L, confidence or policy")
