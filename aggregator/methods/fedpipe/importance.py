"""FedPipe's per-agent importance, selection and per-weight ranks.

Importance of candidate matrix ``m`` for agent ``a`` has two sources:

- the **prior** ``p_a(m)``: the agent's score task before round 1, ``Σ|W ⊙ ∂L/∂W|`` on the
  frozen base (every candidate; no adapter exists yet), normalised to sum to 1;
- the **adapters' sensitivity** ``σ_a(m)``: AdaLoRA's smoothed sensitivity times uncertainty
  of the adapter entries, measured by the agent while it trains
  (``edge_agent/methods/fedpipe/sensitivity.py``), for the matrices it adapted; the latest
  value per matrix is kept.

The two are on different scales, so the adapters' values are rescaled to carry the prior mass
of the matrices they cover: with ``S`` the matrices that have a ``σ``,
``I_a(m) = σ_a(m) · Σ_{S} p_a / Σ_{S} σ_a`` for ``m ∈ S`` and ``I_a(m) = p_a(m)`` otherwise.
Training decides the order among adapted matrices and how much of their mass each carries;
the prior still ranks the ones never adapted against them. An agent without a score of its
own (joined later) uses the example-weighted mean prior of all agents.

Every ``select.every`` rounds each agent's adapted set is chosen again: its top ``count``
matrices by ``I_a`` (``select.mode = "importance"``) or a seeded random set of that size
(``"random"``). Within a set, a rank level ``r`` (what the planner chooses) gives matrix ``m``
the rank ``r · n · I(m)^γ / Σ I^γ`` rounded and clipped to ``[1, min(max rank, in, out)]``
(``γ = plan.rank_spread``; 0 gives every matrix rank ``r``).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from aggregator.methods.fedpipe.plan import Module, natural

TINY = 1e-12


def normalised(values: Mapping[str, float]) -> dict[str, float]:
    total = sum(max(v, 0.0) for v in values.values())
    if total <= 0:
        return dict.fromkeys(values, 1.0 / max(len(values), 1))
    return {m: max(v, 0.0) / total for m, v in values.items()}


@dataclass
class Importance:
    """Priors and adapter sensitivities per agent."""

    prior: dict[str, dict[str, float]] = field(default_factory=dict)
    adapter: dict[str, dict[str, float]] = field(default_factory=dict)
    weight: dict[str, int] = field(default_factory=dict)

    def set_prior(self, agent: str, values: Mapping[str, float], examples: int) -> None:
        self.prior[agent] = normalised(values)
        self.weight[agent] = max(int(examples), 1)

    def add_sensitivity(self, agent: str, values: Mapping[str, float]) -> None:
        known = self.adapter.setdefault(agent, {})
        for m, v in values.items():
            if v >= 0:
                known[m] = float(v)

    def mean_prior(self, candidates: Sequence[str]) -> dict[str, float]:
        total = sum(self.weight.get(a, 1) for a in self.prior)
        if not total:
            return dict.fromkeys(candidates, 1.0 / max(len(candidates), 1))
        return {
            m: sum(self.weight.get(a, 1) * p.get(m, 0.0) for a, p in self.prior.items()) / total
            for m in candidates
        }

    def of(self, agent: str, candidates: Sequence[str]) -> dict[str, float]:
        """``I_a`` over ``candidates`` (see the module's docstring)."""
        prior = self.prior.get(agent) or self.mean_prior(candidates)
        out = {m: prior.get(m, 0.0) for m in candidates}
        sens = {m: v for m, v in self.adapter.get(agent, {}).items() if m in out}
        mass, total = sum(out[m] for m in sens), sum(sens.values())
        if sens and total > 0 and mass > 0:
            for m, v in sens.items():
                out[m] = v * mass / total
        return out

    def to_json(self) -> dict[str, object]:
        return {"prior": self.prior, "adapter": self.adapter, "weight": self.weight}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Importance:
        def nested(key: str) -> dict[str, dict[str, float]]:
            raw = data.get(key) or {}
            assert isinstance(raw, dict)
            return {a: {m: float(v) for m, v in d.items()} for a, d in raw.items()}

        weight = data.get("weight") or {}
        assert isinstance(weight, dict)
        return cls(nested("prior"), nested("adapter"), {a: int(w) for a, w in weight.items()})


def choose(
    agent: str,
    importance: Mapping[str, float],
    count: int,
    *,
    mode: str,
    seed: int,
    round: int,
) -> list[str]:
    """The agent's adapted matrices, in decreasing importance (ties in layer order)."""
    order = sorted(importance, key=lambda m: (-importance[m], natural(m)))
    count = min(count, len(order))
    if mode == "random":
        rng = np.random.default_rng([seed, round, zlib.crc32(agent.encode())])
        picked = set(rng.choice(sorted(order, key=natural), size=count, replace=False).tolist())
        return [m for m in order if m in picked]
    return order[:count]


@dataclass(frozen=True)
class Layout:
    """One agent's adapted matrices (decreasing importance) and their importance; gives the
    per-matrix ranks of a rank level."""

    modules: tuple[Module, ...]
    importance: tuple[float, ...]
    spread: float
    max_rank: int

    def ranks(self, level: int) -> dict[str, int]:
        n = len(self.modules)
        if n == 0:
            return {}
        values = np.maximum(np.asarray(self.importance, dtype=np.float64), 0.0)
        if self.spread == 0 or values.sum() <= 0:
            weights = np.full(n, 1.0 / n)
        else:
            powered = np.maximum(values, TINY * values.max()) ** self.spread
            weights = powered / powered.sum()
        raw = level * n * weights
        out = {}
        for m, x in zip(self.modules, raw, strict=True):
            cap = min(self.max_rank, m.in_features, m.out_features)
            out[m.name] = int(min(max(round(float(x)), 1), cap))
        return out

    def size(self, level: int) -> tuple[int, int]:
        """``(LoRA parameters, total rank)`` at ``level``."""
        ranks = self.ranks(level)
        lora = sum(ranks[m.name] * (m.in_features + m.out_features) for m in self.modules)
        return lora, sum(ranks.values())
