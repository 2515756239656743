"""FedPipe's ΔW-space combination: clipping and robust rules (issue 24 (7))."""

from __future__ import annotations

import pytest
import torch

from aggregator.methods.fedpipe.combine import DeltaCombiner, change_norm
from protocol.methods._common import AggregationParams
from protocol.methods.fedpipe import math as fm
from protocol.methods.fedpipe.spec import FedpipeLora

MODULE = "model.layers.0.self_attn.q_proj"
ALPHA = 8.0
SCALE = FedpipeLora(r=4, alpha=ALPHA, rslora=True).module_scaling  # ALPHA / sqrt(4 r)


def update(rank: int, value: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a_key, b_key = fm.keys(MODULE)
    return {
        a_key: torch.randn(rank, 12, generator=g) * 0.1,
        b_key: torch.full((10, rank), value) + 0.01 * torch.randn(10, rank, generator=g),
    }


def delta(u: dict[str, torch.Tensor]) -> torch.Tensor:
    a_key, b_key = fm.keys(MODULE)
    a, b = u[a_key].double(), u[b_key].double()
    return ALPHA / (4 * a.shape[0]) ** 0.5 * b @ a


def combined(c: DeltaCombiner) -> torch.Tensor:
    u, s, vh = c.svds()[MODULE]
    return (u * s) @ vh


def test_weighted_mean_matches_the_dense_mean_across_ranks() -> None:
    ups = [update(2, 0.5, 1), update(4, 0.6, 2), update(8, 0.4, 3)]
    c = DeltaCombiner(AggregationParams(clip_norm=0), SCALE, {})
    for u, w in zip(ups, (1, 2, 3), strict=True):
        assert c.add(u, w) == 1.0
    expected = sum(w * delta(u) for u, w in zip(ups, (1, 2, 3), strict=True)) / 6
    torch.testing.assert_close(combined(c), expected)


def test_median_and_clip_bound_one_huge_update() -> None:
    honest = [update(2, 0.5, 1), update(4, 0.5, 2), update(8, 0.5, 3)]
    evil = update(4, 1e6, 4)
    clean = sum(delta(u) for u in honest) / 3
    for rule in ("median", "trimmed_mean"):
        c = DeltaCombiner(AggregationParams(rule=rule, trim=0.25, clip_norm=0), SCALE, {})
        for u in [*honest, evil]:
            c.add(u, 10)
        assert float((combined(c) - clean).abs().max()) < 0.5
    plain = DeltaCombiner(AggregationParams(clip_norm=0), SCALE, {})
    clipped = DeltaCombiner(AggregationParams(clip_norm=5.0), SCALE, {})
    for c in (plain, clipped):
        for u in [*honest, evil]:
            c.add(u, 10)
    assert float(combined(plain).norm()) > 1e4  # the control: one update owns the mean
    assert float(combined(clipped).norm()) < 5.0 + float(clean.norm())
    pairs = {MODULE: (evil[fm.keys(MODULE)[0]], evil[fm.keys(MODULE)[1]])}
    assert change_norm(pairs, {}, SCALE) == pytest.approx(float(delta(evil).norm()), rel=1e-9)
