"""FedPipe's per-agent plans: each agent's ranks, batch and precision, round by round.

:meth:`Planner.problem` states the server's parameters, selected matrices and agents as a
:class:`~aggregator.methods.fedpipe.plan.Problem`; :meth:`Planner.extend` solves it for the
agents that have no plan yet (:func:`~aggregator.methods.fedpipe.solve.solve_milp`, else each
agent's smallest configuration) and saves the round's plans as
``<state_dir>/fedpipe/plan-<round>.json``, so that a restart validates the open round's stored
updates against the same plans (:meth:`Planner.stored`).

The profile's one quick matmul at an agent's start-up misjudges a busy machine:
:meth:`Planner.learn_speed` fits each agent's own time constants to its measured rounds
(:mod:`aggregator.methods.fedpipe.fit`, ``plan.fit_time``; otherwise one learnt ``speed``
scales its throughput) and its measured over modelled peak memory (``plan.fit_memory``), and
later plans use them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from aggregator.methods import AgentView
from aggregator.methods.fedpipe import fit, solve
from aggregator.methods.fedpipe import plan as fp
from aggregator.methods.fedpipe.importance import Layout
from aggregator.methods.fedpipe.select import save_json
from protocol.messages import Profile
from protocol.methods.fedpipe import spec

log = logging.getLogger(__name__)


class Planner:
    """The plans of every round so far, the agents' measured training times and learnt speeds,
    and each round's planning metrics (``est_max_s``, ``capacity_relaxed``)."""

    def __init__(self, shape: fp.ModelShape, store: Path | None) -> None:
        self.shape = shape
        self.store = store
        self.plans: dict[int, dict[str, fp.AgentPlan]] = {}
        self.speed: dict[str, float] = {}  # measured step time over the model's, per agent
        self.took: dict[int, dict[str, float]] = {}
        self.peak: dict[int, dict[str, float]] = {}
        self.metrics: dict[int, dict[str, float]] = {}
        self.observations: dict[str, list[fit.Observation]] = {}
        self.time_fit: dict[str, tuple[float, float]] = {}
        self.memory_ratios: dict[str, list[float]] = {}

    # --- the problem ------------------------------------------------------------------------

    def problem(
        self,
        params: spec.Params,
        modules: Sequence[fp.Module],
        agents: Mapping[str, fp.Resources],
        max_len: int = 0,
        layouts: Mapping[str, Layout] | None = None,
    ) -> fp.Problem:
        """``modules`` in decreasing importance; ``max_len`` overrides ``train.max_len``.
        With ``layouts`` (each agent's own matrices) a configuration's rank is one level."""
        p, t = params.plan, params.train
        tiers = (
            ((tuple(modules),) if modules else ()) if layouts else fp.split_tiers(modules, p.tiers)
        )
        per_agent = (
            sum(len(lay.modules) for lay in layouts.values()) / len(layouts)
            if layouts
            else len(modules)
        )
        return fp.Problem(
            tiers=tiers,
            layouts=dict(layouts or {}),
            shape=self.shape,
            agents=agents,
            options=fp.Options(
                ranks=p.ranks,
                batch_sizes=p.batch_sizes,
                quants=p.quants,
                examples_per_round=p.examples_per_round or t.steps * t.batch_size,
                max_len=max_len or t.max_len,
                capacity_floor=p.capacity * len(agents) * per_agent * params.lora.r,
                memory_fraction=p.memory_fraction,
            ),
        )

    def resources(
        self,
        params: spec.Params,
        profile: Profile,
        view: AgentView | None,
        tokens: Mapping[str, float],
    ) -> fp.Resources:
        """An agent as the model sees it: its profile, its link (``view``), its mean tokens per
        example (``tokens``, from its score task) and its learnt speed."""
        limit = float(params.train.max_len)
        return fp.resources(
            profile,
            rtt_ms=view.rtt_ms if view else None,
            bandwidth_mbps=view.bandwidth_mbps if view else None,
            default_bandwidth_mbps=params.plan.default_bandwidth_mbps,
            tokens=min(tokens.get(view.agent_id, limit), limit) if view else limit,
            speed=self.speed.get(view.agent_id, 1.0) if view else 1.0,
            time_fit=self.time_fit.get(view.agent_id) if view and params.plan.fit_time else None,
            memory_factor=(
                fit.memory_factor(self.memory_ratios.get(view.agent_id, []))
                if view and params.plan.fit_memory
                else 1.0
            ),
        )

    # --- plans ------------------------------------------------------------------------------

    def stored(self, round: int) -> dict[str, fp.AgentPlan]:
        """The round's plans: in memory, else as saved before a restart, else none."""
        return self.plans.get(round) or self._read(round) or {}

    def extend(
        self, round: int, stored: Mapping[str, fp.AgentPlan], problem: fp.Problem | None
    ) -> None:
        """The round's plans are ``stored`` and, solved now, those of ``problem``'s agents
        (saved when there are any)."""
        solved = self._solve(round, problem) if problem is not None else {}
        self.plans[round] = {**stored, **solved}
        if problem is not None:
            plans = {a: p.to_json() for a, p in self.plans[round].items()}
            save_json(self.store, f"plan-{round}.json", plans)

    def _solve(self, round: int, problem: fp.Problem) -> dict[str, fp.AgentPlan]:
        try:
            solution = solve.solve_milp(problem)
        except fp.PlanError as exc:
            log.warning("fedpipe: round %d: %s; agents get the smallest configuration", round, exc)
            solution = solve.smallest(problem)
        if solution.capacity_relaxed:
            log.warning("fedpipe: round %d: the capacity floor cannot be met; relaxed", round)
        known = self.metrics.setdefault(round, {"est_max_s": 0.0, "capacity_relaxed": 0.0})
        known["est_max_s"] = max(known["est_max_s"], solution.t_max)
        known["capacity_relaxed"] = max(known["capacity_relaxed"], solution.capacity_relaxed)
        plans = fp.agent_plans(problem, solution)
        for a, ap in sorted(plans.items()):
            log.info("fedpipe: round %d: %s gets %s", round, a, ap.describe())
        return plans

    def _read(self, round: int) -> dict[str, fp.AgentPlan] | None:
        if self.store is None or not (self.store / f"plan-{round}.json").exists():
            return None
        data = json.loads((self.store / f"plan-{round}.json").read_text("utf-8"))
        plans = {a: fp.AgentPlan.from_json(p) for a, p in data.items()}
        self.plans[round] = plans
        return plans

    def details(self, round: int) -> dict[str, dict[str, str]]:
        """Per agent, its plan and (once its update came) its measured training time."""
        took = self.took.get(round, {})
        return {
            a: p.details() | ({"train_s": f"{took[a]:.1f}"} if a in took else {})
            for a, p in self.plans.get(round, {}).items()
        }

    # --- measured times ---------------------------------------------------------------------

    def record(
        self, round: int, agent: str, seconds: float | None, peak: float | None = None
    ) -> None:
        """An agent's training time and peak memory in ``round`` as it reported them (each
        ignored unless positive)."""
        if seconds is not None and math.isfinite(seconds) and seconds > 0:
            self.took.setdefault(round, {})[agent] = seconds
        if peak is not None and math.isfinite(peak) and peak > 0:
            self.peak.setdefault(round, {})[agent] = peak

    def learn_speed(self, round: int) -> None:
        """From each agent's measured round: its time constants (the fit over its last
        :data:`KEEP` observations), its learnt speed (geometric mean of modelled over measured
        training time with what was learnt before) and its memory ratio."""
        for agent, seconds in self.took.get(round, {}).items():
            plan = self.plans.get(round, {}).get(agent)
            if plan is None or seconds <= 0 or plan.compute_s <= 0:
                continue
            observed = min(max(plan.speed * plan.compute_s / seconds, 1e-3), 1e3)
            previous = self.speed.get(agent)
            self.speed[agent] = observed if previous is None else math.sqrt(previous * observed)
            if plan.overhead_s + plan.flop_s > 0:
                obs = self.observations.setdefault(agent, [])
                obs.append(fit.Observation(plan.overhead_s, plan.flop_s, plan.steps, seconds))
                del obs[:-KEEP]
                fitted = fit.fit_time(obs)
                if fitted is not None:
                    self.time_fit[agent] = fitted
        for agent, peak in self.peak.get(round, {}).items():
            plan = self.plans.get(round, {}).get(agent)
            if plan is None or plan.memory_bytes <= 0:
                continue
            modelled = plan.memory_bytes / fit.memory_factor(self.memory_ratios.get(agent, []))
            ratios = self.memory_ratios.setdefault(agent, [])
            ratios.append(peak / modelled)
            del ratios[:-KEEP]

    def fitted(self) -> dict[str, object]:
        """What was learnt, for the checkpoint's metadata."""
        return {
            "speed": {a: round(v, 4) for a, v in self.speed.items()},
            "time_fit": {a: [round(u, 4), round(v, 4)] for a, (u, v) in self.time_fit.items()},
            "memory_ratios": self.memory_ratios,
            "observations": {
                a: [[o.overhead_s, o.flop_s, o.steps, o.seconds] for o in obs]
                for a, obs in self.observations.items()
            },
        }

    def restore_fitted(self, data: Mapping[str, object]) -> None:
        speed = data.get("speed") or {}
        assert isinstance(speed, dict)
        self.speed = {a: float(v) for a, v in speed.items()}
        fits = data.get("time_fit") or {}
        assert isinstance(fits, dict)
        self.time_fit = {a: (float(u), float(v)) for a, (u, v) in fits.items()}
        ratios = data.get("memory_ratios") or {}
        assert isinstance(ratios, dict)
        self.memory_ratios = {a: [float(r) for r in rs] for a, rs in ratios.items()}
        obs = data.get("observations") or {}
        assert isinstance(obs, dict)
        self.observations = {
            a: [fit.Observation(float(f1), float(f2), int(n), float(t)) for f1, f2, n, t in rows]
            for a, rows in obs.items()
        }


KEEP = 8
"""Observations (rounds) per agent that the fits use: the latest."""
