"""FedPipe's two exact solvers of a :class:`~aggregator.methods.fedpipe.plan.Problem`, and a
fallback.

The problem: minimise ``T = max_a time(c_a)`` subject to ``memory(c_a) <= memory_fraction ·
available_a`` and ``Σ_a capacity(c_a) >= capacity_floor`` (capacity = the total rank of an
agent's adapter); then, among configurations with ``time <= T``, maximise
``Σ_a (capacity · BIG + precision level)``: agents off the critical path take the most rank,
then the most precise base, they can without slowing the round. :func:`solve_milp` solves both
stages as MILPs over binary choice variables with HiGHS (``scipy.optimize.milp``, relative gap
0); :func:`solve_exhaustive` enumerates every combination. Tests compare the two.
:func:`smallest` gives each agent its least-memory configuration when neither finds a solution.
The time and memory model is :mod:`aggregator.methods.fedpipe.plan`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aggregator.methods.fedpipe.plan import PRECISION_LEVEL, Config, PlanError, Problem, Solution


@dataclass(frozen=True)
class _Tables:
    """Per agent, the configurations that fit its memory and their time, capacity, value."""

    agents: list[str]
    configs: list[list[Config]]
    time: list[np.ndarray]
    capacity: list[np.ndarray]
    value: list[np.ndarray]
    floor: float
    relaxed: bool


def _tables(problem: Problem) -> _Tables:
    agents = sorted(problem.agents)
    all_configs = problem.configs()
    configs, times, caps, levels = [], [], [], []
    for a in agents:
        ok = [c for c in all_configs if problem.fits(a, c)]
        if not ok:
            raise PlanError(f"agent {a}: no configuration fits its memory")
        est = [problem.estimate(a, c) for c in ok]
        configs.append(ok)
        times.append(np.array([e.seconds for e in est]))
        caps.append(np.array([e.capacity for e in est], dtype=np.int64))
        levels.append(np.array([PRECISION_LEVEL[c.quant] for c in ok], dtype=np.int64))
    big = 3 * len(agents) + 1  # Σ precision levels < big: capacity comes first
    values = [cap * big + lv for lv, cap in zip(levels, caps, strict=True)]
    floor = problem.options.capacity_floor
    relaxed = sum(int(c.max()) for c in caps) < floor
    return _Tables(agents, configs, times, caps, values, 0.0 if relaxed else floor, relaxed)


def _finish(problem: Problem, t: _Tables, picks: Sequence[int], solver: str) -> Solution:
    choice = {a: t.configs[i][k] for i, (a, k) in enumerate(zip(t.agents, picks, strict=True))}
    estimates = {a: problem.estimate(a, c) for a, c in choice.items()}
    t_max = max(float(t.time[i][k]) for i, k in enumerate(picks))
    value = float(sum(int(t.value[i][k]) for i, k in enumerate(picks)))
    return Solution(choice, estimates, t_max, value, t.relaxed, solver)


TIME_TOLERANCE = 1e-9
"""Relative slack on the optimal round time when the second stage keeps configurations."""


def solve_milp(problem: Problem) -> Solution:
    """Both stages as MILPs (HiGHS); raises :class:`PlanError` when it finds no solution."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    t = _tables(problem)
    sizes = [len(c) for c in t.configs]
    offsets = np.cumsum([0, *sizes])
    n, agents = int(offsets[-1]), len(sizes)
    options = {"mip_rel_gap": 0.0, "presolve": True}

    def rows(coefs: Sequence[np.ndarray], width: int) -> coo_array:
        r = np.concatenate([np.full(len(c), i) for i, c in enumerate(coefs)])
        cols = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in range(agents)])
        return coo_array((np.concatenate(coefs), (r, cols)), shape=(len(coefs), width))

    ones = [np.ones(s) for s in sizes]
    cap = np.concatenate(t.capacity).astype(float)
    # stage 1: min T  s.t.  one choice per agent, time_a <= T, Σ capacity >= floor
    width = n + 1
    one_hot = LinearConstraint(rows(ones, width), 1, 1)
    timing = rows(t.time, width).tolil()
    timing[:, n] = -1.0
    capacity = LinearConstraint(np.append(cap, 0.0)[None, :], t.floor, np.inf)
    res = milp(
        c=np.append(np.zeros(n), 1.0),
        integrality=np.append(np.ones(n), 0),
        bounds=Bounds(np.zeros(width), np.append(np.ones(n), np.inf)),
        constraints=[one_hot, LinearConstraint(timing.tocsr(), -np.inf, 0), capacity],
        options=options,
    )
    if not res.success:
        raise PlanError(f"MILP (time): {res.message}")
    x = np.round(res.x[:n]).astype(int)
    picks = [int(np.argmax(x[offsets[i] : offsets[i + 1]])) for i in range(agents)]
    t_star = max(float(t.time[i][k]) for i, k in enumerate(picks))
    # stage 2: max Σ value over configurations no slower than T*
    allowed = np.concatenate(t.time) <= t_star * (1 + TIME_TOLERANCE)
    res2 = milp(
        c=-np.concatenate(t.value).astype(float),
        integrality=np.ones(n),
        bounds=Bounds(np.zeros(n), allowed.astype(float)),
        constraints=[
            LinearConstraint(rows(ones, n), 1, 1),
            LinearConstraint(cap[None, :], t.floor, np.inf),
        ],
        options=options,
    )
    if res2.success:
        x = np.round(res2.x).astype(int)
        picks = [int(np.argmax(x[offsets[i] : offsets[i + 1]])) for i in range(agents)]
    solution = _finish(problem, t, picks, "milp")
    solution.stats = {"variables": float(n), "configs": float(len(problem.configs()))}
    return solution


def solve_exhaustive(problem: Problem, *, limit: int = 4_000_000) -> Solution:
    """Every combination of per-agent configurations; the same two-stage optimum."""
    t = _tables(problem)
    total = math.prod(len(c) for c in t.configs)
    if total > limit:
        raise PlanError(f"{total} combinations exceed the exhaustive limit {limit}")
    grids = np.meshgrid(*[np.arange(len(c)) for c in t.configs], indexing="ij")
    idx = [g.ravel() for g in grids]
    time = np.max([t.time[i][g] for i, g in enumerate(idx)], axis=0)
    cap = np.sum([t.capacity[i][g] for i, g in enumerate(idx)], axis=0)
    value = np.sum([t.value[i][g] for i, g in enumerate(idx)], axis=0)
    ok = cap >= t.floor
    if not ok.any():
        raise PlanError("no combination meets the capacity floor")
    t_star = float(time[ok].min())
    keep = ok & (time <= t_star * (1 + TIME_TOLERANCE))
    best = int(np.flatnonzero(keep)[np.argmax(value[keep])])
    return _finish(problem, t, [int(g[best]) for g in idx], "exhaustive")


def smallest(problem: Problem) -> Solution:
    """Each agent's least-memory configuration (a fallback when the solve has no solution)."""
    choice: dict[str, Config] = {}
    for a in problem.agents:
        memory = {c: problem.estimate(a, c).memory_bytes for c in problem.configs()}
        choice[a] = min(memory, key=memory.__getitem__)
    estimates = {a: problem.estimate(a, c) for a, c in choice.items()}
    t_max = max((e.seconds for e in estimates.values()), default=0.0)
    return Solution(choice, estimates, t_max, 0.0, True, "smallest")
