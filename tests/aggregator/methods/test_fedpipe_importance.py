"""FedPipe's per-agent importance, selection and per-weight ranks
(aggregator/methods/fedpipe/importance.py) and its fitted cost constants (fit.py)."""

from __future__ import annotations

import math

import pytest

from aggregator.methods.fedpipe import fit
from aggregator.methods.fedpipe.importance import Importance, Layout, choose
from aggregator.methods.fedpipe.plan import Module

NAMES = [f"model.layers.{i}.mlp.up_proj" for i in range(6)]


def test_adapter_sensitivity_reorders_the_adapted_matrices_within_their_prior_mass() -> None:
    imp = Importance()
    imp.set_prior("a", {m: float(i + 1) for i, m in enumerate(NAMES)}, 4)  # later: larger
    before = imp.of("a", NAMES)
    assert sum(before.values()) == pytest.approx(1.0)
    assert sorted(NAMES, key=lambda m: -before[m])[:2] == [NAMES[5], NAMES[4]]
    imp.add_sensitivity("a", {NAMES[5]: 1.0, NAMES[4]: 9.0})  # training says 4 matters more
    after = imp.of("a", NAMES)
    assert after[NAMES[4]] > after[NAMES[5]]
    assert after[NAMES[4]] + after[NAMES[5]] == pytest.approx(before[NAMES[4]] + before[NAMES[5]])
    assert after[NAMES[4]] == pytest.approx(0.9 * (before[NAMES[4]] + before[NAMES[5]]))
    assert {m: after[m] for m in NAMES[:4]} == {m: before[m] for m in NAMES[:4]}
    # an agent without a score of its own uses the example-weighted mean prior
    imp.set_prior("b", {m: float(6 - i) for i, m in enumerate(NAMES)}, 12)
    mean = imp.of("c", NAMES)
    assert mean[NAMES[0]] == pytest.approx((4 * 1 / 21 + 12 * 6 / 21) / 16)
    assert Importance.from_json(imp.to_json()).of("a", NAMES) == pytest.approx(after)


def test_choose_by_importance_or_at_random() -> None:
    importance = {m: float(i) for i, m in enumerate(NAMES)}
    assert choose("a", importance, 2, mode="importance", seed=0, round=1) == NAMES[:-3:-1]
    picks = {
        tuple(choose(a, importance, 3, mode="random", seed=0, round=r))
        for a in ("a", "b")
        for r in (1, 3, 5)
    }
    assert all(len(p) == 3 and len(set(p)) == 3 for p in picks)
    assert len(picks) > 1  # differs between agents and selections
    again = choose("a", importance, 3, mode="random", seed=0, round=3)
    assert again == choose("a", importance, 3, mode="random", seed=0, round=3)  # seeded
    assert list(again) == sorted(again, key=lambda m: -importance[m])  # most important first


def layout(importance: list[float], spread: float, max_rank: int = 16) -> Layout:
    mods = tuple(Module(m, 64, 128) for m in NAMES[: len(importance)])
    return Layout(mods, tuple(importance), spread, max_rank)


def test_per_weight_ranks_follow_importance_and_keep_the_level() -> None:
    flat = layout([4.0, 2.0, 1.0, 1.0], 0.0).ranks(8)
    assert set(flat.values()) == {8}
    ranks = layout([4.0, 2.0, 1.0, 1.0], 1.0).ranks(4)
    assert list(ranks.values()) == [8, 4, 2, 2]  # 4 · 4 · s / Σs
    assert sum(ranks.values()) == 16
    half = layout([4.0, 1.0], 0.5).ranks(3)  # √4 : √1 = 2 : 1 of 6
    assert list(half.values()) == [4, 2]
    capped = layout([100.0, 1.0, 1.0], 1.0, max_rank=8).ranks(8)
    assert list(capped.values()) == [8, 1, 1]  # clipped to [1, max rank]
    lora, total = layout([4.0, 2.0, 1.0, 1.0], 1.0).size(4)
    assert total == 16 and lora == 16 * (64 + 128)


def obs(u: float, v: float, f1: float, f2: float, steps: int = 4) -> fit.Observation:
    return fit.Observation(f1, f2, steps, steps * (u * f1 + v * f2))


def test_time_fit_recovers_each_agents_constants() -> None:
    # overhead 3x the prior, per-token cost half of it: different batches separate the two
    rows = [obs(3.0, 0.5, 0.1, f2) for f2 in (0.05, 0.2, 0.8, 1.6)]
    u, v = fit.fit_time(rows, ridge=1e-6) or (0, 0)
    assert u == pytest.approx(3.0, rel=1e-3) and v == pytest.approx(0.5, rel=1e-3)
    u, v = fit.fit_time(rows) or (0, 0)  # the default ridge pulls a little toward one factor
    assert u == pytest.approx(3.0, rel=0.1) and v == pytest.approx(0.5, rel=0.1)
    # one observation cannot separate them: the common factor
    one = [obs(2.0, 2.0, 0.1, 0.3)]
    c = fit.common_factor(one)
    assert c == pytest.approx(2.0)
    assert fit.fit_time(one) == pytest.approx((2.0, 2.0), rel=1e-6)
    assert fit.fit_time([]) is None


def test_memory_factor_is_the_largest_ratio_never_below_one() -> None:
    assert fit.memory_factor([]) == 1.0
    assert fit.memory_factor([0.5, 0.8]) == 1.0
    assert fit.memory_factor([1.3, 2.4, math.nan]) == 2.4
