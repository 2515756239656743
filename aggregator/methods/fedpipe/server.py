"""FedPipe server half: importance selection, per-agent plans, mixed-rank aggregation in ΔW space.

Phases (driven by the engine's optional hooks):

- **score** (before round 1, until a selection exists): every agent scores every candidate
  matrix and the top ones are kept (:mod:`aggregator.methods.fedpipe.select`; the selection is
  also in the checkpoint's metadata, which ``edgefed-aggregator status`` shows).
- **train**: every ``select.every`` rounds each agent's matrices are chosen again by its own
  importance (its score, then its adapters' sensitivity reported with each update:
  :mod:`aggregator.methods.fedpipe.importance`); :meth:`plan` solves each agent's rank level
  (spread over its matrices by importance), batch and precision
  (:mod:`aggregator.methods.fedpipe.planner`, saved so that a restart validates the open
  round's stored updates against the same plan). Each agent is sent the global ``ΔW``
  truncated at its ranks; its update is checked against exactly those shapes and folded into a
  low-rank running sum (:mod:`protocol.methods.fedpipe.math`).
- **eval**: the global ``ΔW`` as exact factors (the global's own rank per module).

The checkpoint holds the global as peft factors (``c(R)·B·A = ΔW``, rank ``R`` per module, ``c``
the module scaling of ``lora``),
so ``aggregator.store.export.merge_into_base`` and :meth:`export` merge it into the base weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aggregator.errors import ConfigError, StateError, UpdateRejected
from aggregator.methods import AgentView, Assignment, MethodContext, Update, decode_update
from aggregator.methods.fedpipe import plan as fp
from aggregator.methods.fedpipe.combine import DeltaCombiner
from aggregator.methods.fedpipe.importance import Importance, Layout, choose
from aggregator.methods.fedpipe.plan import natural
from aggregator.methods.fedpipe.planner import Planner
from aggregator.methods.fedpipe.select import Selection, round_half_up
from aggregator.methods.robust import check_examples
from aggregator.store.checkpoint import atomic_write_bytes
from aggregator.store.export import merge_into_base
from protocol import payloads
from protocol.errors import ErrorCode
from protocol.lora_init import initial_a
from protocol.messages import Profile, TaskResult
from protocol.methods import parse_params
from protocol.methods.fedpipe import math as fm
from protocol.methods.fedpipe import spec

log = logging.getLogger(__name__)


class FedpipeServer:
    name = spec.NAME
    per_agent = True
    """Each agent adapts its own matrices at their own ranks (a regional tier does not: it
    trains the upstream's selection, planned in tiers)."""

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
        self.selection = Selection(self.dir)
        self.planner = Planner(self.shape, self.dir)
        self.global_ab: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._profiles: dict[str, Profile] = {}
        self._regions: set[str] = set()
        self._payloads: dict[tuple[Any, ...], bytes] = {}
        self.importance = Importance()
        self.layouts: dict[str, Layout] = {}
        self.chosen_at: dict[str, int] = {}
        self._sensitivity: dict[tuple[int, str], dict[str, float]] = {}
        self.begin_round(1)
        self._load_selection()

    def _set_candidates(self, target_modules: tuple[str, ...]) -> None:
        targets = set(target_modules)
        self.candidates = {}
        for weight, (out_f, in_f) in sorted(self._linears.items(), key=lambda kv: natural(kv[0])):
            module = weight.removesuffix(".weight")
            if module.rsplit(".", 1)[-1] in targets:
                self.candidates[module] = fp.Module(module, in_f, out_f)
        if not self.candidates:
            raise ConfigError(f"fedpipe: no decoder linear matches {sorted(targets)}")

    @property
    def selected(self) -> list[str]:
        """The selected matrices, in decreasing importance (none before the score phase)."""
        return self.selection.selected

    @property
    def scores(self) -> dict[str, float]:
        return self.selection.scores

    @property
    def tokens(self) -> dict[str, float]:
        return self.selection.tokens

    @property
    def plans(self) -> dict[int, dict[str, fp.AgentPlan]]:
        return self.planner.plans

    @property
    def speed(self) -> dict[str, float]:
        return self.planner.speed

    # --- selection --------------------------------------------------------------------------

    def wants_score(self, round: int) -> bool:
        return not self.selected

    def add_score(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> None:
        region = result.agent_id in self._regions
        weight = self.params.aggregation.weight(result.num_examples, region=region)
        values = self.selection.add(round, result, blobs, self.params, self.candidates, weight)
        self.importance.set_prior(result.agent_id, values, weight)

    def finish_score(self, round: int) -> dict[str, float]:
        return self.selection.finish(self.params, self.candidates)

    def selection_summary(self) -> str:
        return self.selection.summary(len(self.candidates))

    def _load_selection(self) -> None:
        self.selection.load(self.candidates)

    # --- planning ---------------------------------------------------------------------------

    def _problem(
        self,
        agents: Mapping[str, fp.Resources],
        max_len: int = 0,
        layouts: Mapping[str, Layout] | None = None,
    ) -> fp.Problem:
        modules = [self.candidates[m] for m in (self.selected or list(self.candidates))]
        return self.planner.problem(self.params, modules, agents, max_len, layouts)

    def _count(self) -> int:
        s = self.params.select
        n = len(self.candidates)
        return min(n, s.count if s.count is not None else max(1, round_half_up(s.fraction * n)))

    def _layout(self, round: int, agent: str) -> Layout:
        """The agent's adapted matrices and their importance: chosen again on rounds 1,
        1 + every, … (and for an agent that has none), else kept; the importance (hence the
        ranks) is always the latest."""
        s = self.params.select
        importance = self.importance.of(agent, list(self.candidates))
        current = self.layouts.get(agent)
        due = (round - 1) % s.every == 0 and self.chosen_at.get(agent) != round
        if current is None or due:
            names = choose(agent, importance, self._count(), mode=s.mode, seed=s.seed, round=round)
            self.chosen_at[agent] = round
        else:
            names = sorted(
                (m.name for m in current.modules), key=lambda m: (-importance[m], natural(m))
            )
        layout = Layout(
            modules=tuple(self.candidates[m] for m in names),
            importance=tuple(importance[m] for m in names),
            spread=self.params.plan.rank_spread,
            max_rank=max(self.params.plan.ranks),
        )
        self.layouts[agent] = layout
        return layout

    def _resources(self, profile: Profile, view: AgentView | None = None) -> fp.Resources:
        return self.planner.resources(self.params, profile, view, self.tokens)

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
        stored = self.planner.stored(round)
        todo = {
            a: self._resources(v.profile, v)
            for a, v in views.items()
            if a not in stored and a not in self._regions
        }
        per_agent = self.per_agent and self.params.select.per_agent
        layouts = {a: self._layout(round, a) for a in todo} if per_agent else None
        problem = self._problem(todo, layouts=layouts) if todo else None
        self.planner.extend(round, stored, problem)

    def agent_details(self, round: int) -> dict[str, dict[str, str]]:
        return self.planner.details(round)

    def _plan_for(self, round: int, agent_id: str) -> fp.AgentPlan:
        plan = self.plans.get(round, {}).get(agent_id)
        if plan is None:  # assigned but absent when the phase was planned (a restart)
            view = AgentView(agent_id, self._profile(agent_id))
            self.plan(round, "train", {agent_id: view})
            plan = self.plans[round][agent_id]
        return plan

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
            seed = self.params.lora.init_seed
            for module in sorted(ranks, key=natural):  # layer order: compact stacking
                r = ranks[module]
                a_key, b_key = fm.keys(module)
                if module in self.global_ab:
                    a_glob, b_glob = self.global_ab[module]
                    state[a_key], state[b_key] = fm.truncate(
                        a_glob,
                        b_glob,
                        r,
                        self.params.lora.module_scaling,
                        a_key=a_key,
                        init_seed=seed,
                    )
                else:  # adapted by no one yet: the seeded init (ΔW = 0)
                    m = self.candidates[module]
                    state[a_key] = initial_a(a_key, r, m.in_features, seed)
                    state[b_key] = torch.zeros(m.out_features, r, dtype=torch.float32)
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

    def validate(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> Update:
        ranks: Mapping[str, int | None]
        if result.agent_id in self._regions:  # its aggregate: any rank a ΔW can have
            ranks = dict.fromkeys(self.selected)
        else:
            plan = self.planner.stored(round).get(result.agent_id)
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
        extra = sorted(set(blobs) - {spec.UPDATE_BLOB, spec.SENSITIVITY_BLOB})
        if extra:
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, f"unexpected blobs {extra}")
        only = {k: v for k, v in blobs.items() if k == spec.UPDATE_BLOB}
        payload = decode_update(only, spec.UPDATE_BLOB, expect)
        for module, r in fm.ranks_of(payload.tensors).items():
            m = self.candidates[module]
            if r > min(m.in_features, m.out_features):
                raise UpdateRejected(
                    ErrorCode.PAYLOAD_MISMATCH, f"{module}: rank {r} exceeds min(out, in)"
                )
        check_examples(result.num_examples, self.params.max_examples)
        if spec.SENSITIVITY_BLOB in blobs and result.agent_id not in self._regions:
            sens = payloads.Expect(
                kind=payloads.PayloadKind.DENSE,
                method=self.name,
                round=round,
                tensors={m: payloads.TensorSpec((1,), torch.float32) for m in ranks},
            )
            raw = {spec.SENSITIVITY_BLOB: blobs[spec.SENSITIVITY_BLOB]}
            values = {
                m: float(t[0])
                for m, t in decode_update(raw, spec.SENSITIVITY_BLOB, sens).tensors.items()
            }
            bad = [m for m, v in values.items() if not v >= 0 or v == float("inf")]
            if bad:
                raise UpdateRejected(
                    ErrorCode.PAYLOAD_MISMATCH, f"sensitivity of {bad[0]} is not finite, >= 0"
                )
            self._sensitivity[(round, result.agent_id)] = values
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
        agg, scaling = self.params.aggregation, self.params.lora.module_scaling
        self._combined = DeltaCombiner(agg, scaling, self.global_ab)

    def add(self, update: Update) -> None:
        region = update.agent_id in self._regions
        weight = self.params.aggregation.weight(update.num_examples, region=region)
        scale = self._combined.add(update.tensors, weight)
        if scale < 1.0:
            log.info("%s: update clipped (scale %.3g)", update.agent_id, scale)
        self.planner.record(
            self._round,
            update.agent_id,
            update.metrics.get("seconds"),
            update.metrics.get(spec.MEMORY_PEAK),
        )
        sensitivity = self._sensitivity.pop((self._round, update.agent_id), None)
        if sensitivity is not None:
            self.importance.add_sensitivity(update.agent_id, sensitivity)

    def finish_round(self, round: int) -> dict[str, float]:
        weight = self._combined.weight
        metrics = {"selected": float(len(self.selected)), "examples": float(weight)}
        metrics.update(self.planner.metrics.get(round, {}))
        plans = self.plans.get(round, {})
        adapted = {m for p in plans.values() for m in p.ranks}
        if adapted:
            metrics["adapted_union"] = float(len(adapted))
            metrics["reselected"] = float(any(r == round for r in self.chosen_at.values()))
        self.planner.learn_speed(round)
        if weight == 0:
            return metrics
        scaling = self.params.lora.module_scaling
        for module, (u, s, vh) in self._combined.svds().items():
            self.global_ab[module] = fm.global_factors(u, s, vh, scaling)
        self._payloads.clear()
        ranks = [a.shape[0] for a, _ in self.global_ab.values()]
        metrics["global_rank"] = sum(ranks) / max(len(ranks), 1)
        return metrics

    # --- state ------------------------------------------------------------------------------

    def global_state(self) -> dict[str, torch.Tensor]:
        """The global ΔW as a peft adapter state (rank ``R`` per module)."""
        state: dict[str, torch.Tensor] = {}
        for module in sorted(self.global_ab, key=natural):
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
            "fitted": json.dumps(self.planner.fitted()),
            "importance": json.dumps(self.importance.to_json()),
            "layouts": json.dumps(
                {
                    a: [[m.name for m in lay.modules], self.chosen_at.get(a, 0)]
                    for a, lay in self.layouts.items()
                }
            ),
        }
        return self.global_state(), meta

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        if "selected" in meta:
            self.selection.restore(
                json.loads(meta["selected"]),
                json.loads(meta.get("scores", "{}")),
                json.loads(meta.get("tokens", "{}")),
                self.candidates,
            )
        self.planner.speed = {a: float(v) for a, v in json.loads(meta.get("speed", "{}")).items()}
        if "fitted" in meta:
            self.planner.restore_fitted(json.loads(meta["fitted"]))
        if "importance" in meta:
            self.importance = Importance.from_json(json.loads(meta["importance"]))
        for agent, (names, at) in json.loads(meta.get("layouts", "{}")).items():
            if all(m in self.candidates for m in names):
                self.layouts[agent] = Layout(
                    tuple(self.candidates[m] for m in names),
                    (0.0,) * len(names),
                    self.params.plan.rank_spread,
                    max(self.params.plan.ranks),
                )
                self.chosen_at[agent] = int(at)
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


Server = FedpipeServer
