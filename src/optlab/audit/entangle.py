"""Entanglement metrics M1-M9 of a prompt's entity set S over a domain graph (SKeB).

With n = |S|, w(a, b) the co-occurrence weight (0 without an edge), E_S the edges of the
subgraph induced by S:

- M1 sum of w(a, b) over the distinct pairs {a, b} of S
- M2 mean node frequency over S
- M3 mean degree (in the whole graph) over S
- M4 density of the induced subgraph, |E_S| / (n (n - 1) / 2)
- M5 sum of edge weights in the induced subgraph
- M6 M5 / n
- M7 mean shortest-path length (hops) over the pairs of S connected inside the induced
  subgraph; pairs in different components are left out, and 0 when no pair is connected
- M8 |E_S| / n
- M9 spreading activation reaching the target entity (see :func:`spreading_activation`)

M1 and M5 are the same number on a simple graph (the spec lists both, after the paper).
Every metric is 0 for n = 0; for n = 1, M2, M3 and M9 are the only ones that can be nonzero.

>>> g = country_graph()
>>> entanglement(g, g.match("Is Paris the capital of France?"), target="Paris")["M1"]
1.0
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Sequence

from optlab.audit.graph import DomainGraph

METRIC_NAMES = ("M1", "M2", "M3", "M4", "M5", "M6", "M7", "M8", "M9")
DECAY = 0.5
STEPS = 3


def spreading_activation(
    graph: DomainGraph,
    sources: Iterable[str],
    target: str | None,
    *,
    decay: float = DECAY,
    steps: int = STEPS,
) -> float:
    """ACT-R-style spreading activation, read out at ``target``.

    a_0 puts mass 1/n on each source entity (so the total injected is 1 whatever n is);
    a_{t+1} = (1 - d) a_0 + d W a_t, where W[j, i] = w(i, j) / sum_k w(i, k) sends each
    node's activation to its neighbours in proportion to the edge weights (a node without
    edges keeps none of it); after ``steps`` updates M9 = a_T[target]. A target among the
    sources therefore keeps part of its own injection. 0 when there is no source or the target
    is not in the graph.
    """
    sources = [s for s in dict.fromkeys(sources) if s in graph.frequency]
    if not sources or target is None or target not in graph.frequency:
        return 0.0
    start = {s: 1.0 / len(sources) for s in sources}
    strength = {}
    activation = dict(start)
    for _ in range(steps):
        spread: dict[str, float] = {}
        for node, value in activation.items():
            links = graph.neighbours[node]
            if node not in strength:
                strength[node] = sum(links.values())
            for other, w in links.items():
                spread[other] = spread.get(other, 0.0) + value * w / strength[node]
        activation = {k: decay * v for k, v in spread.items()}
        for s, v in start.items():
            activation[s] = activation.get(s, 0.0) + (1 - decay) * v
    return activation.get(target, 0.0)


def _hops_within(graph: DomainGraph, nodes: Sequence[str]) -> list[int]:
    """Shortest-path lengths (edges) between every connected pair, inside the subgraph."""
    inside = set(nodes)
    lengths = []
    for i, start in enumerate(nodes):
        distance = {start: 0}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for nxt in graph.neighbours[node]:
                if nxt in inside and nxt not in distance:
                    distance[nxt] = distance[node] + 1
                    queue.append(nxt)
        lengths += [distance[b] for b in nodes[i + 1 :] if b in distance]
    return lengths


def entanglement(
    graph: DomainGraph,
    entities: Iterable[str],
    target: str | None = None,
    *,
    decay: float = DECAY,
    steps: int = STEPS,
) -> dict[str, float]:
    """M1-M9 for an entity set (names or aliases; unknown names are ignored)."""
    nodes = [c for c in dict.fromkeys(graph.canonical(e) for e in entities) if c is not None]
    n = len(nodes)
    pairs = list(itertools.combinations(nodes, 2))
    pair_weights = [graph.weight(a, b) for a, b in pairs]
    induced = [w for w in pair_weights if w > 0]
    hops = _hops_within(graph, nodes)
    total = float(sum(pair_weights))
    return {
        "M1": total,
        "M2": sum(graph.frequency[x] for x in nodes) / n if n else 0.0,
        "M3": sum(graph.degree(x) for x in nodes) / n if n else 0.0,
        "M4": len(induced) / len(pairs) if pairs else 0.0,
        "M5": float(sum(induced)),
        "M6": sum(induced) / n if n else 0.0,
        "M7": sum(hops) / len(hops) if hops else 0.0,
        "M8": len(induced) / n if n else 0.0,
        "M9": spreading_activation(
            graph, nodes, target and graph.canonical(target), decay=decay, steps=steps
        ),
    }
