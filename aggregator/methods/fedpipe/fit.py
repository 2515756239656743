"""FedPipe's per-agent cost constants, fitted to what each agent measured.

The time model of :mod:`aggregator.methods.fedpipe.plan` splits a training step into two terms,
both computed at the agent's profiled matmul throughput ``G_q``::

    f₁ = OVERHEAD_GFLOP[q] / G_q                          (fixed cost per step, s)
    f₂ = KAPPA[q] · b · L̄ · (4·P_body + 6·P_lora) / 1e9 / G_q   (cost per token, s)
    step_s = u · f₁ + v · f₂

The prior constants (measured once on the development box) are ``u = v = 1``. Each round an
agent reports its training seconds for the plan it ran (``steps`` steps with terms ``f₁, f₂``);
:func:`fit_time` fits the agent's own ``(u, v) ≥ 0`` to all its observations by non-negative
least squares on relative errors, pulled towards one common factor (the geometric mean of its
measured over modelled times) by a small ridge, so one observation, or several of the same
shape, give that common factor and observations of different batch or rank separate the two.

Memory: the agent reports its peak (GPU allocated, else the process's maximum resident set);
:func:`memory_factor` is the largest measured-over-modelled ratio seen, never below 1, and
multiplies the modelled memory of that agent's later plans (``plan.fit_memory``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RIDGE = 0.01
"""Weight of the pull of ``(u, v)`` towards the common factor, per unit of relative error."""
LIMITS = (1e-3, 1e3)
"""Bounds on any fitted factor."""


@dataclass(frozen=True)
class Observation:
    overhead_s: float
    """``f₁`` of the plan the agent ran (unscaled)."""
    flop_s: float
    """``f₂`` of that plan (unscaled)."""
    steps: int
    seconds: float
    """Measured training seconds of the round."""


def _clip(x: float) -> float:
    return min(max(x, LIMITS[0]), LIMITS[1])


def common_factor(observations: Sequence[Observation]) -> float | None:
    """Geometric mean of measured over modelled time (``u = v``), None without observations."""
    logs = [
        math.log(o.seconds / (o.steps * (o.overhead_s + o.flop_s)))
        for o in observations
        if o.seconds > 0 and o.steps > 0 and o.overhead_s + o.flop_s > 0
    ]
    return _clip(math.exp(sum(logs) / len(logs))) if logs else None


def fit_time(
    observations: Sequence[Observation], ridge: float = RIDGE
) -> tuple[float, float] | None:
    """The agent's ``(u, v)``: NNLS on ``u·f₁ + v·f₂ = seconds / steps`` in relative terms,
    plus ``ridge·(u − c, v − c)`` with ``c`` the common factor; None without observations."""
    from scipy.optimize import nnls

    c = common_factor(observations)
    if c is None:
        return None
    rows, target = [], []
    for o in observations:
        step = o.seconds / o.steps
        rows.append([o.overhead_s / step, o.flop_s / step])
        target.append(1.0)
    root = math.sqrt(ridge)
    rows += [[root, 0.0], [0.0, root]]
    target += [root * c, root * c]
    (u, v), _ = nnls(np.asarray(rows), np.asarray(target))
    return _clip(float(u)), _clip(float(v))


def memory_factor(ratios: Sequence[float]) -> float:
    """The largest measured-over-modelled memory ratio, never below 1."""
    finite = [r for r in ratios if math.isfinite(r) and r > 0]
    return max([1.0, *finite])
