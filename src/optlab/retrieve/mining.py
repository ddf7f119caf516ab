"""Positives and negatives from the LLM's scores (spec section 3).

Positive: the best-scoring candidate among those with one_shot_acc > 0 (an example with
none is dropped). Hard negatives: the ``hard`` worst-scoring candidates. Random negatives:
``random`` prompts from the whole multi-task pool, of other tasks only.

>>> table = {"t/0": {"uid": "t/0", "task": "t", "candidates": [
...     {"uid": "t/1", "score": 0.2, "acc": 0.0}, {"uid": "t/2", "score": 0.4, "acc": 1.0},
...     {"uid": "t/3", "score": 0.9, "acc": 1.0}]}}
>>> mine(table, pool_uids={"t": ["t/0", "t/1", "t/2", "t/3"], "u": ["u/0"]}, hard=1,
...      random_negatives=1)[0]
{'uid': 't/0', 'task': 't', 'positive': 't/2', 'hard': ['t/3'], 'random': ['u/0']}
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any


def mine(
    table: Mapping[str, Mapping[str, Any]],
    *,
    pool_uids: Mapping[str, Sequence[str]],
    hard: int = 20,
    random_negatives: int = 20,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One record per kept example, in the table's (sorted-uid) order. Candidates in the
    table are sorted by ascending score (the scorer keeps them so); ``pool_uids`` maps each
    task to the uids of its pool. The hard negatives never include the positive."""
    records = []
    for uid in sorted(table):
        row = table[uid]
        candidates = row["candidates"]
        positive = next((c["uid"] for c in candidates if c["acc"] > 0), None)
        if positive is None:
            continue
        worst = [c["uid"] for c in reversed(candidates) if c["uid"] != positive][:hard]
        others = [u for task, uids in pool_uids.items() if task != row["task"] for u in uids]
        rng = random.Random(f"{seed}/{uid}")
        picked = rng.sample(others, min(random_negatives, len(others)))
        records.append({"uid": uid, "task": row["task"], "positive": positive, "hard": worst,
                        "random": picked})  # fmt: skip
    return records
