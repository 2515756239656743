"""FedPipe server half: importance selection, per-agent plans, mixed-rank aggregation in ΔW space.

Phases (driven by the engine's optional hooks):

- **score** (before round 1, until a selection exists): every agent scores every candidate
  matrix; :meth:`add_score` checks and accumulates the scores weighted by examples,
  :meth:`finish_score` keeps the top matrices. The selection is written to
  ``<state_dir>/fedpipe/selection.json`` at once (a restart does not rescore) and to the
  checkpoint's metadata (``edgefed-aggregator status`` shows it).
- **train**: :meth:`plan` solves each agent's ranks, batch and precision
  (:mod:`aggregator.methods._fedpipe_plan`), saved as ``plan-<round>.json`` so that a restart
  validates the open round's stored updates against the same plan. Each agent is sent the
  global ``ΔW`` truncated at its ranks; its update is checked against exactly those shapes and
  folded into a low-rank running sum (:mod:`protocol.methods._fedpipe_math`).
- **eval**: the global ``ΔW`` as exact factors (the global's own rank per module).

The checkpoint holds the global as peft factors (``(alpha/R)·B·A = ΔW``, rank ``R`` per module),
so ``aggregator.export.merge_into_base`` and :meth:`export` merge it into the base weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aggregator.checkpoint import atomic_write_bytes
from aggregator.errors import ConfigError, StateError, UpdateRejected
from aggregator.export import merge_into_base
from aggregator.methods import AgentView, Assignment, MethodContext, Update, decode_update
from aggregator.methods import _fedpipe_plan as fp
from protocol import payloads
from protocol.errors import ErrorCode
from protocol.messages import Profile, TaskResult
from protocol.methods import _fedpipe_math as fm
from protocol.methods import fedpipe as spec
from protocol.methods import parse_params

log = logging.getLogger(__name__)

MAX_SCORE_ATTEMPTS = 2
"""Score phases without one valid score before the selection falls back to layer order."""


class FedpipeServer:
    name = spec.NAME

    def __init__(self, params: Mapping[str, Any], context: MethodContext | None = None) -> None:
        parsed = parse_params(spec.NAME, params)
        assert isinstance(parsed, spec.Params)
        if parsed.ranks:
            raise ConfigError("fedpipe: method.ranks is chosen per agent; do not set it")
        self.params: spec.Params = parsed
        context = context or MethodContext()
        if context.model_dir is None:
            raise ConfigError(
                "fedpipe needs the base model's files on the aggregator: set run.model_dir"
            )
        self.model_dir = Path(context.model_dir)
        self.shape, self._linears = fp.model_shape(self.model_dir)
        self.candidates: dict[str, fp.Module] = {}
        self._set_candidates(parsed.lora.target_modules)
        self.dir = Path(context.state_dir) / "fedpipe" if context.state_dir else None
        self.selected: list[str] = []  # in decreasing importance
        self.scores: dict[str, float] = {}
        self.tokens: dict[str, float] = {}
        self.speed: dict[str, float] = {}  # measured step time over the model's, per agent
        self._took: dict[int, dict[str, float]] = {}
        self.global_ab: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.plans: dict[int, dict[str, fp.AgentPlan]] = {}
        self._score_sum: dict[str, float] = {}
        self._score_weight = 0
        self._score_attempts = 0
        self._scored: set[str] = set()
        self._profiles: dict[str, Profile] = {}
        self._regions: set[str] = set()
        self._payloads: dict[tuple[Any, ...], bytes] = {}
        self._metrics: dict[int, dict[str, float]] = {}
        self.begin_round(1)
        self._load_selection()

    def _set_candidates(self, target_modules: tuple[str, ...]) -> None:
        targets = set(target_modules)
        self.candidates = {}
        for weight, (out_f, in_f) in sorted(self._linears.items(), key=lambda kv: _natural(kv[0])):
            module = weight.removesuffix(".weight")
            if module.rsplit(".", 1)[-1] in targets:
                self.candidates[module] = fp.Module(module, in_f, out_f)
        if not self.candidates:
            raise ConfigError(f"fedpipe: no decoder linear matches {sorted(targets)}")

    # --- selection --------------------------------------------------------------------------

    def wants_score(self, round: int) -> bool:
        return not self.selected

    def add_score(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> None:
        expect = payloads.Expect(
            kind=payloads.PayloadKind.DENSE,
            method=self.name,
            round=round,
            tensors={m: payloads.TensorSpec((1,), torch.float32) for m in self.candidates},
        )
        payload = decode_update(blobs, spec.SCORE_BLOB, expect)
        self._check_examples(result.num_examples)
        values = {m: float(t[0]) for m, t in payload.tensors.items()}
        negative = [m for m, v in values.items() if v < 0]
        if negative:
            raise UpdateRejected(
                ErrorCode.PAYLOAD_MISMATCH, f"negative importance for {negative[0]}"
            )
        mean = result.metrics.get(spec.TOKENS_MEAN)
        if mean is not None:
            limit = self.params.score.max_len
            if not 1 <= mean <= limit:
                raise UpdateRejected(
                    ErrorCode.PAYLOAD_MISMATCH, f"{spec.TOKENS_MEAN} {mean} outside [1, {limit}]"
                )
            self.tokens[result.agent_id] = mean
        for m, v in values.items():
            self._score_sum[m] = self._score_sum.get(m, 0.0) + v * result.num_examples
        self._score_weight += result.num_examples
        self._scored.add(result.agent_id)

    def finish_score(self, round: int) -> dict[str, float]:
        self._score_attempts += 1
        fallback = 0.0
        if self._score_weight == 0:
            if self._score_attempts < MAX_SCORE_ATTEMPTS:
                log.warning("fedpipe: no valid importance scores; scoring again")
                return {"scored_agents": 0.0}
            log.warning(
                "fedpipe: no valid scores after %d tries: selecting in layer order",
                self._score_attempts,
            )
            self._score_sum, self._score_weight, fallback = (
                {m: 0.0 for m in self.candidates},
                1,
                1.0,
            )
        self.scores = {m: self._score_sum[m] / self._score_weight for m in self.candidates}
        order = sorted(self.candidates, key=lambda m: (-self.scores[m], _natural(m)))
        s = self.params.select
        count = s.count if s.count is not None else max(1, round_half_up(s.fraction * len(order)))
        self.selected = order[: min(count, len(order))]
        self._save(
            "selection.json",
            {"selected": self.selected, "scores": self.scores, "tokens": self.tokens},
        )
        log.info("fedpipe: selected %s", self.selection_summary())
        return {
            "selected": float(len(self.selected)),
            "scored_agents": float(len(self._scored)),
            "score_fallback": fallback,
        }

    def selection_summary(self) -> str:
        kinds: dict[str, int] = {}
        for m in self.selected:
            kind = m.rsplit(".", 1)[-1]
            kinds[kind] = kinds.get(kind, 0) + 1
        parts = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
        return f"{len(self.selected)} of {len(self.candidates)} matrices ({parts})"

    def _load_selection(self) -> None:
        if self.dir is None or not (self.dir / "selection.json").exists():
            return
        data = json.loads((self.dir / "selection.json").read_text("utf-8"))
        self._set_selection(data["selected"], data.get("scores", {}), data.get("tokens", {}))
        log.info("fedpipe: selection read from %s", self.dir / "selection.json")

    def _set_selection(
        self, selected: list[str], scores: dict[str, float], tokens: Mapping[str, Any]
    ) -> None:
        unknown = [m for m in selected if m not in self.candidates]
        if unknown or not selected:
            raise StateError(f"fedpipe: the stored selection names unknown matrices {unknown[:3]}")
        self.selected, self.scores = list(selected), dict(scores)
        self.tokens = {a: float(t) for a, t in tokens.items()}

    def _save(self, name: str, data: object) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.dir / name, json.dumps(data, indent=1).encode())

    # --- planning ---------------------------------------------------------------------------

    def _problem(self, agents: Mapping[str, fp.Resources], max_len: int = 0) -> fp.Problem:
        p, t = self.params.plan, self.params.train
        modules = [self.candidates[m] for m in (self.selected or list(self.candidates))]
        return fp.Problem(
            tiers=fp.split_tiers(modules, p.tiers),
            shape=self.shape,
            agents=agents,
            options=fp.Options(
                ranks=p.ranks,
                batch_sizes=p.batch_sizes,
                quants=p.quants,
                examples_per_round=p.examples_per_round or t.steps * t.batch_size,
                max_len=max_len or t.max_len,
                capacity_floor=p.capacity * len(agents) * len(modules) * self.params.lora.r,
                memory_fraction=p.memory_fraction,
            ),
        )

    def _resources(self, profile: Profile, view: AgentView | None = None) -> fp.Resources:
        limit = float(self.params.train.max_len)
        return fp.resources(
            profile,
            rtt_ms=view.rtt_ms if view else None,
            bandwidth_mbps=view.bandwidth_mbps if view else None,
            default_bandwidth_mbps=self.params.plan.default_bandwidth_mbps,
            tokens=min(self.tokens.get(view.agent_id, limit), limit) if view else limit,
            speed=self.speed.get(view.agent_id, 1.0) if view else 1.0,
        )

    def on_hello(self, view: AgentView) -> None:
        if view.role == "region":
            self._regions.add(view.agent_id)
        else:
            self._regions.discard(view.agent_id)

    def admit(self, agent_id: str, profile: Profile) -> str | None:
        """None when the smallest configuration fits the agent's memory, else why not."""
        self._profiles[agent_id] = profile
        if agent_id in self._regions:
            return None  # a regional tier plans its own agents
        problem = self._problem({agent_id: self._resources(profile)})
        return fp.refusal(problem, agent_id)

    def plan(self, round: int, kind: str, views: Mapping[str, AgentView]) -> None:
        for a, v in views.items():
            self._profiles[a] = v.profile
        if kind != "train":
            return
        # agents that already have this round's plan (saved before a restart) keep it: their
        # task may be running, and their stored update is checked against it
        stored = self.plans.get(round) or self._read_plan(round) or {}
        todo = {
            a: self._resources(v.profile, v)
            for a, v in views.items()
            if a not in stored and a not in self._regions
        }
        self.plans[round] = {**stored, **(self._solve(round, todo) if todo else {})}
        if todo:
            self._save(f"plan-{round}.json", {a: p.to_json() for a, p in self.plans[round].items()})

    def _solve(self, round: int, agents: Mapping[str, fp.Resources]) -> dict[str, fp.AgentPlan]:
        problem = self._problem(agents)
        try:
            solution = fp.solve_milp(problem)
        except fp.PlanError as exc:
            log.warning("fedpipe: round %d: %s; agents get the smallest configuration", round, exc)
            solution = fp.smallest(problem)
        if solution.capacity_relaxed:
            log.warning("fedpipe: round %d: the capacity floor cannot be met; relaxed", round)
        known = self._metrics.setdefault(round, {"est_max_s": 0.0, "capacity_relaxed": 0.0})
        known["est_max_s"] = max(known["est_max_s"], solution.t_max)
        known["capacity_relaxed"] = max(known["capacity_relaxed"], solution.capacity_relaxed)
        plans = fp.agent_plans(problem, solution)
        for a, ap in sorted(plans.items()):
            log.info("fedpipe: round %d: %s gets %s", round, a, ap.describe())
        return plans

    def agent_details(self, round: int) -> dict[str, dict[str, str]]:
        took = self._took.get(round, {})
        return {
            a: p.details() | ({"train_s": f"{took[a]:.1f}"} if a in took else {})
            for a, p in self.plans.get(round, {}).items()
        }

    def _learn_speed(self, round: int) -> None:
        """Scale each agent's throughput by its modelled over its measured training time
        (geometric mean with what was learnt before): the profile's one quick matmul at
        start-up misjudges a busy machine."""
        for agent, seconds in self._took.get(round, {}).items():
            plan = self.plans.get(round, {}).get(agent)
            if plan is None or seconds <= 0 or plan.compute_s <= 0:
                continue
            observed = min(max(plan.speed * plan.compute_s / seconds, 1e-3), 1e3)
            previous = self.speed.get(agent)
            self.speed[agent] = observed if previous is None else math.sqrt(previous * observed)

    def _plan_for(self, round: int, agent_id: str) -> fp.AgentPlan:
        plan = self.plans.get(round, {}).get(agent_id)
        if plan is None:  # assigned but absent when the phase was planned (a restart)
            view = AgentView(agent_id, self._profile(agent_id))
            self.plan(round, "train", {agent_id: view})
            plan = self.plans[round][agent_id]
        return plan

    def _read_plan(self, round: int) -> dict[str, fp.AgentPlan] | None:
        if self.dir is None or not (self.dir / f"plan-{round}.json").exists():
            return None
        data = json.loads((self.dir / f"plan-{round}.json").read_text("utf-8"))
        plans = {a: fp.AgentPlan.from_json(p) for a, p in data.items()}
        self.plans[round] = plans
        return plans

    # --- what agents are sent ---------------------------------------------------------------

    def assign(self, round: int, agent_id: str, kind: str) -> Assignment:
        base = self.params.model_dump(mode="json")
        if agent_id in self._regions:
            return self._region_assignment(round, kind)
        if kind == "score":
            sc = self.params.score
            resources = self._resources(self._profile(agent_id))
            problem = self._problem({agent_id: resources}, max_len=sc.max_len)
            quant = fp.memory_quant(problem, agent_id, batch=sc.batch_size)
            return Assignment(params=base, quant=quant)
        if kind == "eval":
            plan = self.plans.get(round, {}).get(agent_id)
            if plan is None:
                problem = self._problem({agent_id: self._resources(self._profile(agent_id))})
                quant = fp.memory_quant(problem, agent_id, batch=self.params.eval.batch_size)
            else:
                quant = plan.quant
            blobs = {spec.GLOBAL_BLOB: self._eval_payload(round)} if self.global_ab else {}
            return Assignment(params=base, blobs=blobs, quant=quant)
        plan = self._plan_for(round, agent_id)
        ranks = plan.module_ranks(self._tiers())
        train = self.params.train.model_copy(update={"batch_size": plan.batch, "steps": plan.steps})
        params = self.params.model_copy(update={"ranks": ranks, "train": train})
        blobs = {spec.GLOBAL_BLOB: self._train_payload(round, ranks)} if self.global_ab else {}
        return Assignment(params=params.model_dump(mode="json"), blobs=blobs, quant=plan.quant)

    def _region_assignment(self, round: int, kind: str) -> Assignment:
        """A regional tier's task: no ranks; the selection and the global as exact factors."""
        if kind == "score":
            return Assignment(params=self.params.model_dump(mode="json"))
        params = self.params.model_copy(update={"selected": tuple(self.selected)})
        blobs = {spec.GLOBAL_BLOB: self._eval_payload(round)} if self.global_ab else {}
        return Assignment(params=params.model_dump(mode="json"), blobs=blobs)

    def _profile(self, agent_id: str) -> Profile:
        profile = self._profiles.get(agent_id)
        if profile is None:
            raise StateError(f"fedpipe: agent {agent_id} has no known profile")
        return profile

    def _tiers(self) -> list[list[str]]:
        modules = [self.candidates[m] for m in self.selected]
        return [[m.name for m in tier] for tier in fp.split_tiers(modules, self.params.plan.tiers)]

    def _train_payload(self, round: int, ranks: Mapping[str, int]) -> bytes:
        key = ("train", round, tuple(sorted(ranks.items())))
        if key not in self._payloads:
            state: dict[str, torch.Tensor] = {}
            for module in sorted(ranks, key=_natural):  # layer order: compact stacking
                r = ranks[module]
                a_key, b_key = fm.keys(module)
                a_glob, b_glob = self.global_ab[module]
                state[a_key], state[b_key] = fm.truncate(
                    a_glob, b_glob, r, a_key=a_key, init_seed=self.params.lora.init_seed
                )
            self._cache_payload(key, payloads.encode_lora(state, method=self.name, round=round))
        return self._payloads[key]

    def _eval_payload(self, round: int) -> bytes:
        key = ("eval", round)
        if key not in self._payloads:
            self._cache_payload(
                key, payloads.encode_lora(self.global_state(), method=self.name, round=round)
            )
        return self._payloads[key]

    def _cache_payload(self, key: tuple[Any, ...], data: bytes) -> None:
        for old in [k for k in self._payloads if k[1] < key[1]]:
            del self._payloads[old]
        self._payloads[key] = data

    # --- what comes back --------------------------------------------------------------------

    def _check_examples(self, n: int) -> None:
        if not 1 <= n <= self.params.max_examples:
            raise UpdateRejected(
                ErrorCode.REJECTED_UPDATE,
                f"example count {n} outside [1, {self.params.max_examples}]",
            )

    def validate(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> Update:
        ranks: Mapping[str, int | None]
        if result.agent_id in self._regions:  # its aggregate: any rank a ΔW can have
            ranks = dict.fromkeys(self.selected)
        else:
            plans = self.plans.get(round) or self._read_plan(round) or {}
            plan = plans.get(result.agent_id)
            if plan is None:
                raise UpdateRejected(
                    ErrorCode.PAYLOAD_MISMATCH, f"no plan for {result.agent_id} in round {round}"
                )
            ranks = plan.module_ranks(self._tiers())
        specs: dict[str, payloads.TensorSpec] = {}
        for module, r in ranks.items():
            m = self.candidates[module]
            a_key, b_key = fm.keys(module)
            specs[a_key] = payloads.TensorSpec((r, m.in_features), torch.float32)
            specs[b_key] = payloads.TensorSpec((m.out_features, r), torch.float32)
        expect = payloads.Expect(
            kind=payloads.PayloadKind.LORA, method=self.name, round=round, tensors=specs
        )
        payload = decode_update(blobs, spec.UPDATE_BLOB, expect)
        for module, r in fm.ranks_of(payload.tensors).items():
            m = self.candidates[module]
            if r > min(m.in_features, m.out_features):
                raise UpdateRejected(
                    ErrorCode.PAYLOAD_MISMATCH, f"{module}: rank {r} exceeds min(out, in)"
                )
        self._check_examples(result.num_examples)
        return Update(
            result.agent_id,
            result.task_id,
            result.num_examples,
            payload.tensors,
            dict(result.metrics),
        )

    # --- aggregation ------------------------------------------------------------------------

    def begin_round(self, round: int) -> None:
        self._round = round
        self._sums: dict[str, fm.LowRankSum] = {}
        self._weight = 0

    def add(self, update: Update) -> None:
        alpha = self.params.lora.alpha
        for key, a in update.tensors.items():
            module = fm.module_of(key)
            if module is None or not key.endswith(fm.A_SUFFIX):
                continue
            b = update.tensors[fm.keys(module)[1]]
            self._sums.setdefault(module, fm.LowRankSum()).add(a, b, update.num_examples, alpha)
        self._weight += update.num_examples
        seconds = update.metrics.get("seconds")
        if seconds is not None and math.isfinite(seconds) and seconds > 0:
            self._took.setdefault(self._round, {})[update.agent_id] = seconds

    def finish_round(self, round: int) -> dict[str, float]:
        metrics = {"selected": float(len(self.selected)), "examples": float(self._weight)}
        metrics.update(self._metrics.get(round, {}))
        self._learn_speed(round)
        if self._weight == 0:
            return metrics
        alpha = self.params.lora.alpha
        for module, acc in self._sums.items():
            u, s, vh = acc.svd(float(self._weight))
            self.global_ab[module] = fm.global_factors(u, s, vh, alpha)
        self._payloads.clear()
        ranks = [a.shape[0] for a, _ in self.global_ab.values()]
        metrics["global_rank"] = sum(ranks) / max(len(ranks), 1)
        return metrics

    # --- state ------------------------------------------------------------------------------

    def global_state(self) -> dict[str, torch.Tensor]:
        """The global ΔW as a peft adapter state (rank ``R`` per module)."""
        state: dict[str, torch.Tensor] = {}
        for module in sorted(self.global_ab, key=_natural):
            a, b = self.global_ab[module]
            a_key, b_key = fm.keys(module)
            state[a_key], state[b_key] = a, b
        return state

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        meta = {
            "params": json.dumps(self.params.model_dump(mode="json"), sort_keys=True),
            "selection": self.selection_summary(),
            "selected": json.dumps(self.selected),
            "scores": json.dumps({m: float(f"{v:.6g}") for m, v in self.scores.items()}),
            "tokens": json.dumps(self.tokens),
            "speed": json.dumps({a: round(v, 4) for a, v in self.speed.items()}),
        }
        return self.global_state(), meta

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        if "selected" in meta:
            self._set_selection(
                json.loads(meta["selected"]),
                json.loads(meta.get("scores", "{}")),
                json.loads(meta.get("tokens", "{}")),
            )
        self.speed = {a: float(v) for a, v in json.loads(meta.get("speed", "{}")).items()}
        self._set_global(tensors, "the checkpoint")

    def _set_global(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """The global ``ΔW`` from peft factors (a checkpoint's or an upstream's)."""
        self.global_ab = {}
        for key, a in tensors.items():
            module = fm.module_of(key)
            if module is None or not key.endswith(fm.A_SUFFIX):
                continue
            if module not in self.candidates:
                raise StateError(f"fedpipe: {source} adapts {module}, not in this model")
            self.global_ab[module] = (
                a.to(torch.float32).clone(),
                tensors[fm.keys(module)[1]].to(torch.float32).clone(),
            )
        self._payloads.clear()

    def export(self, out_dir: Path, *, base_model_name: str) -> dict[str, Path]:
        """The base model with the global ΔW merged in (no adapter: no inference latency)."""
        if not self.global_ab:
            raise StateError("there is no global ΔW to export yet (no round has completed)")
        out_dir = Path(out_dir)
        merge_into_base(self.model_dir, out_dir, self.global_state(), self.params.lora)
        with contextlib.suppress(FileNotFoundError):
            (out_dir / "edgefed-model.json").unlink()  # the model store's cache marker
        info = {"method": self.name, "base_model": base_model_name, "selected": self.selected}
        atomic_write_bytes(out_dir / "fedpipe.json", (json.dumps(info, indent=2) + "\n").encode())
        return {"model": out_dir, "weights": out_dir / "model.safetensors", "adapter": out_dir}


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _natural(name: str) -> list[tuple[int, int | str]]:
    import re

    return [(0, int(p)) if p.isdecimal() else (1, p) for p in re.split(r"([0-9]+)", name) if p]


Server = FedpipeServer
