"""The reward, case by case against values worked by hand from the spec's rules.

Allowed exits (2, 4, 6, 8) on an 8-layer model: L_max = 8, so a negative reward r becomes
r / (8 gamma)."""

from __future__ import annotations

import pytest

from optlab.early_exit.reward import CONTINUE, EXIT, exit_reward

EXITS = (2, 4, 6, 8)

# (action, layer, l*, prediction equals the target, target, reward)
CASES = [
    # final target ---------------------------------------------------------------------
    (EXIT, 4, 4, True, "final", 1.0),  # l* is allowed: exit exactly there
    (EXIT, 4, 3, True, "final", 1.0),  # l* = 3 not allowed: the first allowed exit above
    (EXIT, 4, 3, False, "final", 1.0),  # best exit even if layer 4 flips back (the code too)
    (EXIT, 6, 3, True, "final", -3 / 8),  # late, still right: -alpha (6 - 3)
    (EXIT, 2, 5, False, "final", -3 / 8),  # early and wrong: -beta (5 - 2)
    (EXIT, 2, 8, False, "final", -6 / 8),  # only the final layer agrees with itself
    (EXIT, 6, 3, False, "final", -0.1 / 8),  # past l* but wrong again: -eps
    (CONTINUE, 2, 5, False, "final", 1.0),  # l < l*: going on is right
    (CONTINUE, 4, 3, True, "final", -3 / 8),  # should have exited: -gamma (6 - 3)
    (CONTINUE, 4, 4, True, "final", -2 / 8),  # -gamma (6 - 4)
    (CONTINUE, 6, 6, True, "final", -2 / 8),  # the next allowed exit is the final layer
    (CONTINUE, 6, 8, False, "final", 1.0),
    # label target (env_rand.py) -----------------------------------------------------------
    (EXIT, 4, 3, True, "label", 1.0),
    (EXIT, 4, 3, False, "label", -1 / 8),  # the best exit but not the label: -1, not -eps
    (EXIT, 6, 3, True, "label", -3 / 8),
    (EXIT, 6, 3, False, "label", -1 / 8),
    (EXIT, 2, 5, False, "label", -3 / 8),
    (CONTINUE, 2, 5, False, "label", 1.0),
    (CONTINUE, 4, 3, True, "label", -3 / 8),
]


@pytest.mark.parametrize(("action", "layer", "best", "matches", "target", "expected"), CASES)
def test_reward_case_by_case(action, layer, best, matches, target, expected) -> None:
    got = exit_reward(action, layer, best=best, exits=EXITS, matches=matches, target=target)
    assert got == pytest.approx(expected, abs=1e-12)


def test_the_weights_and_the_scaling_by_gamma() -> None:
    """alpha, beta, eps scale their branch; gamma scales continue and the divisor L_max gamma."""
    kw = dict(exits=EXITS)
    assert exit_reward(EXIT, 6, best=3, matches=True, alpha=0.75, **kw) == pytest.approx(-2.25 / 8)
    assert exit_reward(EXIT, 2, best=5, matches=False, beta=2.0, **kw) == pytest.approx(-6 / 8)
    assert exit_reward(EXIT, 6, best=3, matches=False, eps=0.3, **kw) == pytest.approx(-0.3 / 8)
    # continue: -gamma (6 - 3) / (8 gamma) is gamma-free; an exit penalty is divided by it
    assert exit_reward(CONTINUE, 4, best=3, matches=True, gamma=2.0, **kw) == pytest.approx(-3 / 8)
    assert exit_reward(EXIT, 6, best=3, matches=True, gamma=2.0, **kw) == pytest.approx(-3 / 16)
    assert exit_reward(CONTINUE, 2, best=5, matches=False, gamma=2.0, **kw) == 1.0


def test_every_reward_lies_in_minus_one_to_one() -> None:
    """L_max = L bounds the worst penalty, -(L - 1), inside [-1, 0)."""
    exits = (1, 3, 5, 8)
    for best in range(1, 9):
        for layer in exits[:-1]:
            for action in (CONTINUE, EXIT):
                for matches in (False, True):
                    for target in ("final", "label"):
                        r = exit_reward(action, layer, best=best, exits=exits, matches=matches,
                                        target=target)  # fmt: skip
                        assert -1.0 <= r <= 1.0 and r != 0.0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(action=EXIT, layer=8, best=3), "below the final"),  # never consulted at L
        (dict(action=EXIT, layer=3, best=3), "not an allowed exit"),
        (dict(action=EXIT, layer=4, best=9), "outside"),
        (dict(action=2, layer=4, best=3), "action"),
        (dict(action=EXIT, layer=4, best=3, target="oracle"), "target"),
    ],
)
def test_bad_arguments_are_refused(kwargs, needle) -> None:
    action, layer = kwargs.pop("action"), kwargs.pop("layer")
    with pytest.raises(ValueError, match=needle):
        exit_reward(action, layer, exits=EXITS, matches=True, **kwargs)
