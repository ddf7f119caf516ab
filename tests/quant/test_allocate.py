"""Bit allocation: budgets are honoured and optimal, tiers follow centroids."""

import itertools
import random

import pytest

from optlab.errors import OptlabError
from optlab.quant.allocate import (
    allocate_budget,
    allocate_tiers,
    allocate_uniform,
    parse_widths,
    protected,
)


def _instance(seed: int, units: int = 5):
    rng = random.Random(seed)
    scores = {f"u{i}": rng.random() for i in range(units)}
    counts = {u: rng.randint(100, 900) for u in scores}
    return scores, counts


def _brute_force(scores, counts, widths, budget):
    best = -1.0
    for combo in itertools.product(widths, repeat=len(scores)):
        chosen = dict(zip(scores, combo, strict=True))
        if sum(counts[u] * b for u, b in chosen.items()) <= budget:
            value = sum(protected(scores[u], b, min(widths)) for u, b in chosen.items())
            best = max(best, value)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("avg_bits", [3.2, 4.5, 6.0, 9.7])
def test_budget_is_never_exceeded_and_the_allocation_is_optimal(seed, avg_bits) -> None:
    widths = (16, 8, 4, 3)
    scores, counts = _instance(seed)
    total = sum(counts.values())
    budget = avg_bits * total
    bits = allocate_budget(scores, counts, widths, budget, resolution=4000)
    assert set(bits.values()) <= set(widths)
    assert sum(counts[u] * b for u, b in bits.items()) <= budget
    value = sum(protected(scores[u], b, 3) for u, b in bits.items())
    # Costs are rounded up to a grid of budget/4000 steps: at most one step lost per unit.
    step = (budget - 3 * total) / 4000
    assert value >= _brute_force(scores, counts, widths, budget - len(scores) * step) - 1e-9


def test_equal_sizes_more_sensitive_never_gets_fewer_bits() -> None:
    scores = {f"u{i}": s for i, s in enumerate([0.3, 0.9, 0.1, 0.5, 0.7, 0.2])}
    bits = allocate_budget(scores, dict.fromkeys(scores, 100), (16, 8, 4), 7 * 600)
    ranked = sorted(scores, key=scores.get)
    assert [bits[u] for u in ranked] == sorted(bits[u] for u in ranked)
    assert sum(bits.values()) * 100 <= 7 * 600


def test_impossible_budget_is_a_clear_error_and_a_roomy_one_keeps_fp16() -> None:
    scores, counts = _instance(0)
    total = sum(counts.values())
    with pytest.raises(OptlabError, match=r"budget impossible.*--widths"):
        allocate_budget(scores, counts, (16, 8, 4), 3.9 * total)
    assert set(allocate_budget(scores, counts, (16, 8, 4), 16 * total).values()) == {16}
    assert set(allocate_budget(scores, counts, (16, 8, 4), 4 * total).values()) == {4}


def test_tiers_follow_the_centroids_not_the_cluster_labels() -> None:
    values = [0.9, 0.1, 0.52, 0.11, 0.95, 0.5, 0.12, 0.93]
    for seed in range(4):  # k-means numbers its clusters arbitrarily; the mapping must not care
        bits = allocate_tiers({f"u{i}": v for i, v in enumerate(values)}, (4, 16, 8), seed)
        assert list(bits.values()) == [16, 4, 8, 4, 16, 8, 4, 16]
    assert set(allocate_tiers({"a": 1.0, "b": 1.0}, (16, 8, 4)).values()) == {16}


def test_uniform_and_width_parsing() -> None:
    assert allocate_uniform(["a", "b"], 3) == {"a": 3, "b": 3}
    assert parse_widths("4,16,8") == (16, 8, 4)
    for bad in ("16,5", "16,16", "", "x"):
        with pytest.raises(OptlabError, match="bad bit widths"):
            parse_widths(bad)
    with pytest.raises(OptlabError, match="widths"):
        allocate_uniform(["a"], 6)
