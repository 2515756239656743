"""The sparse communication graph of SecAgg+ (Bell et al. 2020): a k-regular Harary-style ring.

The round's participants are sorted, shuffled by a seed both sides know (the aggregator
announces it), and placed on a ring; each is joined to the ``k // 2`` nearest on either side
(``k`` even). An agent shares its secrets with, and masks against, its neighbours only, so
cost grows with ``k`` rather than with the number of agents. With ``n - 1 <= k`` the graph is
complete, which is plain SecAgg.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from protocol.secagg.errors import SecAggError


def neighbours(participants: Iterable[str], degree: int, seed: int) -> dict[str, list[str]]:
    """Each participant's neighbours (sorted), in a ``degree``-regular ring shuffled by ``seed``."""
    ids = sorted(set(participants))
    n = len(ids)
    if degree < 2 or degree % 2:
        raise SecAggError(f"the secure-aggregation degree must be even and >= 2, got {degree}")
    digest = hashlib.sha256(f"edgefed secagg graph {seed}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
    order = [ids[i] for i in rng.permutation(n)]
    half = min(degree // 2, (n - 1) // 2)
    graph: dict[str, set[str]] = {a: set() for a in ids}
    for pos, agent in enumerate(order):
        for step in range(1, half + 1):
            other = order[(pos + step) % n]
            graph[agent].add(other)
            graph[other].add(agent)
    if n - 1 <= degree:  # small rounds: everyone with everyone
        graph = {a: set(ids) - {a} for a in ids}
    return {a: sorted(peers) for a, peers in graph.items()}
