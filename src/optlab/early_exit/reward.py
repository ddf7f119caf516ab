"""The exit policy's reward (GREEN-CODE, spec section 2): one pure function, no model.

Layers count decoder blocks (1..L) as everywhere in optlab; ``exits`` are the allowed exits,
ascending and ending with the final layer L (:func:`~optlab.early_exit.exits.resolve_exits`),
and the policy decides at every exit below L. ``best`` is l*, the first layer (any layer,
allowed or not) whose argmax equals the target token: the final layer's argmax (``final``)
or the ground-truth next token (``label``).

Exit at l:
  * +1 if l is the first allowed exit >= l* (``label``: and its prediction is the label);
  * else, if l's prediction equals the target: -alpha (l - l*);
  * else, if l < l*: -beta (l* - l);
  * else: -eps (``final``) or -1 (``label``).
Continue at l: +1 if l < l*, else -gamma (next allowed exit - l*).
A negative reward is divided by L_max * gamma; +1 stays +1.

Confirmed against the official code (``src/models/rl/enviornments/``): the branch order and
the best-exit test (``is_best_exit``: l* itself when allowed, else the first allowed exit
above it); ``env_rand.py``'s label variant (the +1 also needs the prediction to equal the
label, and the last branch is -1); the scaling (``min_max_scaling_to_range(r,
-allowed_exits[-1] * gamma, 0, -1, 0)`` is exactly ``r / (L_max * gamma)`` for r <= 0, with
L_max the last allowed exit). Where the code and the spec differ, the spec is followed:
``env_rew_scaled.py`` uses alpha = 0.75, a positive reward of the exit's position
``index / (len(exits) - 1)`` instead of +1, and -1 instead of -eps; those are the keyword
arguments here except the position reward. optlab's L_max is the final layer L (the last
allowed exit, since the final layer always is one), which keeps every scaled reward in
[-1, 1]; the official OPT setting's last allowed exit (27 of 32) does not.

>>> exits = (2, 4, 6, 8)
>>> exit_reward(EXIT, 4, best=3, exits=exits, matches=True)  # first allowed exit >= l* = 3
1.0
>>> exit_reward(EXIT, 6, best=3, exits=exits, matches=True)  # late: -(6 - 3) / 8
-0.375
>>> exit_reward(CONTINUE, 6, best=6, exits=exits, matches=True)  # -(8 - 6) / 8
-0.25
"""

from __future__ import annotations

from collections.abc import Sequence

CONTINUE, EXIT = 0, 1
TARGETS = ("final", "label")


def exit_reward(
    action: int,
    layer: int,
    *,
    best: int,
    exits: Sequence[int],
    matches: bool,
    target: str = "final",
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    eps: float = 0.1,
) -> float:
    """The scaled reward of ``action`` (:data:`CONTINUE` or :data:`EXIT`) at allowed exit
    ``layer`` for a token whose l* is ``best``; ``matches``: layer's argmax is the target."""
    if target not in TARGETS:
        raise ValueError(f"target {target!r}: choose one of {', '.join(TARGETS)}")
    if layer not in exits[:-1]:
        raise ValueError(f"layer {layer} is not an allowed exit below the final layer {exits}")
    if not 1 <= best <= exits[-1]:
        raise ValueError(f"l* = {best} is outside 1..{exits[-1]}")
    if action == EXIT:
        first_allowed = next(e for e in exits if e >= best)  # exists: the final layer is one
        if layer == first_allowed and (matches or target == "final"):
            return 1.0
        if matches:
            reward = -alpha * (layer - best)
        elif layer < best:
            reward = -beta * (best - layer)
        else:
            reward = -eps if target == "final" else -1.0
    elif action == CONTINUE:
        if layer < best:
            return 1.0
        next_allowed = next(e for e in exits if e > layer)
        reward = -gamma * (next_allowed - best)
    else:
        raise ValueError(f"action {action!r}: 0 (continue) or 1 (exit)")
    return reward / (exits[-1] * gamma)
