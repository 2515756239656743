"""Ferret's dense (group, seed) coefficient grid: built by agents, summed under masks, turned
back into the plain server's triples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protocol import payloads
from protocol.methods.ferret import grid, spec
from protocol.methods.ferret import math as fm
from protocol.secagg import fixedpoint, wire


def _triples(rows: list[tuple[int, int, float]]) -> tuple[torch.Tensor, ...]:
    g, s, v = zip(*rows, strict=True)
    return (
        torch.tensor(g, dtype=torch.int32),
        torch.tensor(s, dtype=torch.int32),
        torch.tensor(v, dtype=torch.float32),
    )


def test_the_grid_holds_each_triple_at_group_times_k_plus_seed() -> None:
    g, s, v = _triples([(0, 3, 0.5), (2, 0, -1.25), (1, 1, 2.0)])
    dense, clipped = grid.dense_grid(g, s, v, n_groups=3, k=4, clip_norm=10.0)
    assert dense.shape == (12,) and clipped == 0
    want = np.zeros(12)
    want[[3, 8, 5]] = [0.5, -1.25, 2.0]
    np.testing.assert_array_equal(dense, want)
    back = grid.triples_from_grid(dense, 4)
    assert back[0].tolist() == [0, 1, 2] and back[1].tolist() == [3, 1, 0]
    assert back[2].tolist() == [0.5, 2.0, -1.25]


def test_agents_clamp_as_the_plain_server_clamps() -> None:
    g, s, v = _triples([(0, 0, 12.5), (0, 1, -30.0), (1, 0, 9.99)])
    dense, clipped = grid.dense_grid(g, s, v, n_groups=2, k=2, clip_norm=10.0)
    assert clipped == 2
    # the plain FerretServer.validate: values.clamp(-bound, bound) on the float32 tensor
    np.testing.assert_array_equal(dense[[0, 1, 2]], v.clamp(-10.0, 10.0).double().numpy())


def test_triples_outside_the_grid_or_repeated_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        grid.dense_grid(*_triples([(0, 4, 1.0)]), n_groups=1, k=4, clip_norm=1.0)
    with pytest.raises(ValueError, match="outside"):
        grid.dense_grid(*_triples([(1, 0, 1.0)]), n_groups=1, k=4, clip_norm=1.0)
    with pytest.raises(ValueError, match="more than once"):
        grid.dense_grid(*_triples([(0, 1, 1.0), (0, 1, 2.0)]), n_groups=1, k=4, clip_norm=1.0)


def test_the_masked_sum_of_grids_rebuilds_the_plain_step() -> None:
    """The plain server's weighted mean over triples and the fixed-point sum of the agents'
    weighted grids, divided by the weights, give the same triples within the fixed-point
    bound, and the same step (apply_step, bit-exact code) within float tolerance."""
    k, shapes = 8, {"a": (64, 32), "b": (32,), "c": (48, 16)}
    layout = fm.build_layout(shapes)
    n_groups = len(layout.groups)
    rng = np.random.default_rng(3)
    agents = []
    for weight in (3, 5, 11):
        rows = []
        for gi in range(n_groups):
            for seed in rng.choice(k, size=int(rng.integers(2, k + 1)), replace=False):
                rows.append((gi, int(seed), float(rng.normal(0, 0.01))))
        agents.append((weight, _triples(rows)))
    # the plain path (FerretServer.add and finish_round)
    sums = torch.zeros(n_groups * k, dtype=torch.float64)
    for weight, (g, s, v) in agents:
        sums.index_add_(0, g.long() * k + s.long(), v.double() * weight)
    total_w = sum(w for w, _ in agents)
    plain = grid.triples_from_grid((sums / total_w).to(torch.float32), k)
    # the secure path: fixed-point weighted grids summed in the ring
    ring = np.zeros(n_groups * k, dtype=np.uint64)
    for weight, (g, s, v) in agents:
        dense, _ = grid.dense_grid(g, s, v, n_groups=n_groups, k=k, clip_norm=100.0)
        ring = ring + fixedpoint.encode(dense * weight, 100.0 * weight, 24)
    mean = fixedpoint.decode(ring, 24) / total_w
    bound = fixedpoint.sum_error_bound(len(agents), 24)
    error = np.abs(mean - (sums / total_w).numpy())
    assert error.max() <= bound and error.max() > 0  # it did go through fixed point
    secure = grid.triples_from_grid(mean, k)
    assert torch.equal(plain[0], secure[0]) and torch.equal(plain[1], secure[1])
    # float32 coefficients of magnitude >= 1/2 are exact at 24 fraction bits; what differs
    # is within the bound plus one float32 rounding
    assert float((plain[2] - secure[2]).abs().max()) <= bound + 2.0**-22
    steps = []
    for g, s, v in (plain, secure):
        params = {n: torch.zeros(shape) for n, shape in shapes.items()}
        fm.apply_step(params, layout, 1234, g, s, v, server_lr=1.0, clip_norm=10.0)
        steps.append(params)
    for name in shapes:
        torch.testing.assert_close(steps[1][name], steps[0][name], rtol=1e-5, atol=1e-6)
        assert steps[0][name].abs().max() > 0


def test_the_layout_names_the_pool_and_round_trips_through_the_wire() -> None:
    layout = grid.grid_layout(2**63 + 5, 256, 212)
    assert layout.entries == [("coef", (212, 256))] and layout.length == 212 * 256
    assert layout.kind == payloads.PayloadKind.SEEDCOEF.value
    assert wire.layout_from(wire.layout_blob(layout)) == layout
    assert layout != grid.grid_layout(2**63 + 6, 256, 212)  # another round's pool


def test_the_no_update_metric_is_ferrets_out_of_sync() -> None:
    assert wire.NO_UPDATE_METRIC == spec.OUT_OF_SYNC
    assert wire.masked_weight(7, {spec.OUT_OF_SYNC: 1.0}, dp=False) == 0
    assert wire.masked_weight(7, {}, dp=False) == 7
    assert wire.masked_weight(0, {}, dp=False) == 1
    assert wire.masked_weight(7, {}, dp=True) == 1
