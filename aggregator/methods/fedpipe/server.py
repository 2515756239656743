"""FedPipe server half: importance selection, per-agent plans, mixed-rank aggregation in ΔW space.

Phases (driven by the engine's optional hooks):

- **score** (before round 1, until a selection exists): every agent scores every candidate
  matrix and the top ones are kept (:mod:`aggregator.methods.fedpipe.select`; the selection is
  also in the checkpoint's metadata, which ``edgefed-aggregator status`` shows).
- **train**: :meth:`plan` solves each agent's ranks, batch and precision
  (:mod:`aggregator.methods.fedpipe.planner`, saved so that a restart validates the open
  round's stored updates against the same plan). Each agent is sent the global ``ΔW``
  truncated at its ranks; its update is checked against exactly those shapes and folded into a
  low-rank running sum (:mod:`protocol.methods.fedpipe.math`).
- **eval**: the global ``ΔW`` as exact factors (the global's own rank per module).

The checkpoint holds the global as peft factors (``(alpha/R)·B·A = ΔW``, rank ``R`` per module),
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
from aggregator.methods.fedpipe.plan import natural
from aggregator.methods.fedpipe.planner import Planner
from aggregator.methods.fedpipe.select import Selection
from aggregator.methods.robust import check_examples
from aggregator.store.checkpoint import atomic_write_bytes
from aggregator.store.export import merge_into_base
from protocol import payloads
from protocol.errors import ErrorCode
from protocol.messages import Profile, TaskResult
from protocol.methods import parse_params
from protocol.methods.fedpipe import math as fm
from protocol.methods.fedpipe import spec

log = logging.getLogger(__name__)


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
        self.selection = Selection(self.dir)
        self.planner = Planner(self.shape, self.dir)
        self.global_ab: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._profiles: dict[str, Profile] = {}
        self._regions: set[str] = set()
        self._payloads: dict[tuple[Any, ...], bytes] = {}
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
        self.selection.add(round, result, blobs, self.params, self.candidates)

    def finish_score(self, round: int) -> dict[str, float]:
        return self.selection.finish(self.params, self.candidates)

    def selection_summary(self) -> str:
        return self.selection.summary(len(self.candidates))

    def _load_selection(self) -> None:
        self.selection.load(self.candidates)

    # --- planning ---------------------------------------------------------------------------

    def _problem(self, agents: Mapping[str, fp.Resources], max_len: int = 0) -> fp.Problem:
        modules = [self.candidates[m] for m in (self.selected or list(self.candidates))]
        return self.planner.problem(self.params, modules, agents, max_len)

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
        self.planner.extend(round, stored, self._problem(todo) if todo else None)

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
            for module in sorted(ranks, key=natural):  # layer order: compact stacking
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
        payload = decode_update(blobs, spec.UPDATE_BLOB, expect)
        for module, r in fm.ranks_of(payload.tensors).items():
            m = self.candidates[module]
            if r > min(m.in_features, m.out_features):
                raise UpdateRejected(
                    ErrorCode.PAYLOAD_MISMATCH, f"{module}: rank {r} exceeds min(out, in)"
                )
        check_examples(result.num_examples, self.params.max_examples)
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
        self.planner.record(self._round, update.agent_id, update.metrics.get("seconds"))

    def finish_round(self, round: int) -> dict[str, float]:
        metrics = {"selected": float(len(self.selected)), "examples": float(self._weight)}
        metrics.update(self.planner.metrics.get(round, {}))
        self.planner.learn_speed(round)
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
