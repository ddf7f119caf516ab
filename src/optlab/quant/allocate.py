"""Give each unit (decoder layer or linear) a bit width: under a budget, by tiers, or uniform.

Budgeted allocation is a multiple-choice knapsack solved exactly by dynamic programming over a
discretised budget. Each unit u starts at the lowest width b_min; raising it to b costs
cost_u(b) - cost_u(b_min) (weights x bits for an average-bits budget, stored bytes for a size
budget) and protects

    value_u(b) = s_u * (1 - 2^-(b - b_min))

of its sensitivity: the rounding error of a weight halves with every extra bit, so the share
of the damage measured at b_min that is avoided is 1 - 2^-(b - b_min). Costs are rounded *up*
onto the grid, so the chosen widths never exceed the budget.

>>> allocate_budget({"a": 0.9, "b": 0.1}, {"a": 100, "b": 100}, (16, 8, 4), budget=1200)
{'a': 8, 'b': 4}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from optlab.errors import OptlabError

WIDTHS = (2, 3, 4, 8, 16)


def parse_widths(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"16,8,4"`` -> (16, 8, 4), checked against the supported widths, highest first."""
    try:
        widths = [int(w) for w in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise OptlabError(f"bad bit widths {text!r}: e.g. 16,8,4") from None
    bad = [w for w in widths if w not in WIDTHS]
    if bad or not widths or len(set(widths)) != len(widths):
        raise OptlabError(
            f"bad bit widths {text!r}: distinct values from {', '.join(map(str, WIDTHS))}"
        )
    return tuple(sorted(widths, reverse=True))


def protected(score: float, bits: float, lowest: float) -> float:
    return score * (1 - 2.0 ** -(bits - lowest))


def allocate_budget(
    scores: dict[str, float],
    cost: Callable[[str, float], float] | dict[str, int],
    widths: Sequence[float],
    budget: float,
    *,
    resolution: int = 4000,
) -> dict[str, float]:
    """Widths maximising sum_u value_u(b_u) subject to sum_u cost_u(b_u) <= budget.

    ``cost`` is ``cost(unit, bits)`` or a dict of weight counts (then cost = count x bits).
    Widths may be fractional: a GGUF type's bits per weight, its block scales included.
    Raises ``OptlabError`` when even the lowest width everywhere exceeds the budget.
    """
    if isinstance(cost, dict):
        counts = cost
        cost = lambda unit, bits: counts[unit] * bits  # noqa: E731
    widths = sorted(widths)
    lowest = widths[0]
    units = list(scores)
    base = sum(cost(u, lowest) for u in units)
    if base > budget:
        raise OptlabError(
            f"budget impossible: even {lowest} bits everywhere needs {base:.6g}, over "
            f"{budget:.6g} (allow lower widths, e.g. --widths 16,8,4,3,2, or raise the budget)"
        )
    if sum(cost(u, widths[-1]) for u in units) <= budget:
        return dict.fromkeys(units, widths[-1])
    spare = budget - base
    extra = np.array([[cost(u, b) - cost(u, lowest) for b in widths] for u in units], float)
    if spare <= 0 or extra[:, 1:].min(initial=np.inf) > spare:
        return {u: lowest for u in units}
    # Scores may be negative (pruning can help a little); every bit above b_min still gets a
    # tiny value so that spare budget is spent rather than left over.
    positive = np.array([max(scores[u], 0.0) for u in units])
    floor = 1e-6 * (positive.max() if positive.max() > 0 else 1.0)
    value = np.array([[protected(p + floor, b, lowest) for b in widths] for p in positive])
    step = spare / resolution
    steps = np.ceil(extra / step - 1e-9).astype(int)  # round up: never over budget
    best = np.zeros(resolution + 1)
    choice = np.zeros((len(units), resolution + 1), dtype=np.int8)
    for i in range(len(units)):
        candidates = np.full((len(widths), resolution + 1), -np.inf)
        for k in range(len(widths)):
            c = steps[i, k]
            if c <= resolution:
                candidates[k, c:] = best[: resolution + 1 - c] + value[i, k]
        choice[i] = candidates.argmax(0)
        best = candidates.max(0)
    chosen, capacity = {}, int(best.argmax())
    for i in reversed(range(len(units))):
        k = int(choice[i, capacity])
        chosen[units[i]] = widths[k]
        capacity -= steps[i, k]
    assert sum(cost(u, b) for u, b in chosen.items()) <= budget + 1e-6 * abs(budget)
    return {u: chosen[u] for u in units}


def allocate_tiers(scores: dict[str, float], tiers: Sequence[int], seed: int = 0) -> dict[str, int]:
    """The paper's tiering: k-means on the scores with k = len(tiers); the cluster with the
    highest centroid gets the highest width (the official code maps unsorted labels)."""
    from sklearn.cluster import KMeans

    tiers = sorted(tiers, reverse=True)
    values = np.array(list(scores.values()), float).reshape(-1, 1)
    k = min(len(tiers), len(np.unique(values)))
    if k < 2:
        return dict.fromkeys(scores, tiers[0])
    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(values)
    order = np.argsort(-kmeans.cluster_centers_[:, 0])  # rank 0 = highest centroid
    rank = np.empty(k, int)
    rank[order] = np.arange(k)
    # With fewer clusters than tiers, ranks spread over the tiers from highest to lowest.
    tier_of = [tiers[round(r * (len(tiers) - 1) / (k - 1))] for r in range(k)]
    return {u: tier_of[rank[label]] for u, label in zip(scores, kmeans.labels_, strict=True)}


def allocate_uniform(units: Sequence[str], bits: int) -> dict[str, int]:
    if bits not in WIDTHS:
        raise OptlabError(f"cannot quantize to {bits} bits; widths: {', '.join(map(str, WIDTHS))}")
    return dict.fromkeys(units, bits)
