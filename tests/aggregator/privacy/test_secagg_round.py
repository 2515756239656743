"""Whole SecAgg+ rounds in-process: the agent halves against the aggregator half.

The unmasked sum equals the float64 sum within the documented fixed-point error; agents that
drop after sharing or after masking leave the survivors' sum exact; too many dropouts fail
cleanly; the aggregator's object never holds an individual update, masked or not.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest

from aggregator.privacy.secagg import SecAggServer
from edge_agent.privacy.secagg import SecAggClient
from protocol.secagg import fixedpoint
from protocol.secagg.errors import SecAggError
from protocol.secagg.shapes import SecAggConfig, UnmaskRequest

LENGTH = 257


def _updates(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {f"agent-{i:03d}": rng.normal(0, 1, LENGTH) for i in range(n)}


def _arrays(obj: object, seen: set[int] | None = None) -> Iterable[np.ndarray]:
    """Every numpy array reachable from ``obj``'s attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v, seen)
    elif isinstance(obj, list | tuple | set):
        for v in obj:
            yield from _arrays(v, seen)
    elif hasattr(obj, "__dict__"):
        yield from _arrays(vars(obj), seen)


def _round(
    config: SecAggConfig,
    updates: dict[str, np.ndarray],
    *,
    drop_before_share: Iterable[str] = (),
    drop_after_share: Iterable[str] = (),
    drop_after_mask: Iterable[str] = (),
    watch: list[np.ndarray] | None = None,
) -> np.ndarray:
    context = "run-1/3"
    server = SecAggServer(context, config, graph_seed=11, length=LENGTH)
    clients = {a: SecAggClient(a, context, config) for a in updates}
    for a in set(clients) - set(drop_before_share):
        server.on_advert(a, clients[a].advertise())
    rosters = server.rosters()
    for a, roster in rosters.items():
        if a not in drop_before_share:
            server.on_shares(a, clients[a].share(roster))
    inboxes = server.inboxes()
    encoded = []
    for a, inbox in inboxes.items():
        if a in drop_after_share:
            continue
        masked = clients[a].mask(inbox, updates[a])
        server.on_masked(a, masked)
        encoded.append(fixedpoint.encode(updates[a], config.clip_range, config.fraction_bits))
        if watch is not None:  # the server holds no individual vector, masked or encoded
            for held in _arrays(server):
                assert not any(np.array_equal(held, e) for e in encoded)
                assert not any(np.allclose(held, u) for u in updates.values())
    request = server.unmask_request()
    for a in request.survivors:
        if a not in drop_after_mask:
            server.on_revealed(a, clients[a].unmask(request))
    return server.finish()


@pytest.mark.parametrize(("n", "degree"), [(3, 8), (10, 4), (25, 6)])
def test_unmasked_sum_equals_the_plain_sum(n: int, degree: int) -> None:
    config = SecAggConfig(degree=degree, clip_range=8.0)
    updates = _updates(n)
    total = _round(config, updates, watch=[])
    plain = np.sum(list(updates.values()), axis=0)
    error = float(np.max(np.abs(total - plain)))
    assert error <= fixedpoint.sum_error_bound(n, config.fraction_bits)
    assert error > 0  # it really went through fixed point


def test_agents_dropping_after_sharing_and_after_masking() -> None:
    config = SecAggConfig(degree=6, threshold_ratio=0.6, clip_range=8.0)
    updates = _updates(12)
    ids = sorted(updates)
    after_share, after_mask, before = {ids[1]}, {ids[5]}, {ids[9]}
    total = _round(
        config,
        updates,
        drop_before_share=before,
        drop_after_share=after_share,
        drop_after_mask=after_mask,
    )
    # agents that masked count (even one that died before revealing); the others do not
    survivors = [a for a in ids if a not in after_share | before]
    plain = np.sum([updates[a] for a in survivors], axis=0)
    assert np.max(np.abs(total - plain)) <= fixedpoint.sum_error_bound(12, 24)


def test_too_many_dropouts_fail_cleanly() -> None:
    config = SecAggConfig(degree=4, threshold_ratio=0.75, clip_range=8.0)  # t = 3 of 4
    updates = _updates(8)
    ids = sorted(updates)
    with pytest.raises(SecAggError, match="too many agents dropped out"):
        _round(config, updates, drop_after_mask=set(ids[:5]))


def test_too_few_agents_left_fail_before_anything_is_revealed() -> None:
    config = SecAggConfig(degree=4, clip_range=8.0, min_survivors=3)
    updates = _updates(4)
    ids = sorted(updates)
    with pytest.raises(SecAggError, match="agents sent masked vectors, 3 needed"):
        _round(config, updates, drop_after_share=set(ids[:2]))


def test_stages_run_in_order() -> None:
    config = SecAggConfig(degree=2, clip_range=8.0)
    client = SecAggClient("a", "ctx", config)
    client.advertise()
    with pytest.raises(SecAggError, match="unmask asked during share"):
        client.unmask(UnmaskRequest(("a", "b"), ()))


def test_conflicting_unmask_lists_are_refused() -> None:
    config = SecAggConfig(degree=2, clip_range=8.0, min_survivors=2)
    updates = _updates(3)
    server = SecAggServer("c", config, 1, LENGTH)
    clients = {a: SecAggClient(a, "c", config) for a in updates}
    for a, c in clients.items():
        server.on_advert(a, c.advertise())
    for a, roster in server.rosters().items():
        server.on_shares(a, clients[a].share(roster))
    for a, inbox in server.inboxes().items():
        clients[a].mask(inbox, updates[a])
    first = sorted(updates)[0]
    with pytest.raises(SecAggError, match="both survivor and dropped"):
        clients[first].unmask(UnmaskRequest(tuple(sorted(updates)), (sorted(updates)[1],)))


def test_a_value_outside_the_range_stops_the_agent() -> None:
    config = SecAggConfig(degree=2, clip_range=1.0)
    updates = {a: np.full(LENGTH, 0.5) for a in ("a", "b", "c")}
    updates["b"][3] = 2.0
    with pytest.raises(SecAggError, match="outside the secure-aggregation range"):
        _round(config, updates)
