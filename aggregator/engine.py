"""The round engine: a sans-IO state machine that runs a federated run.

It takes decoded messages and the time, and returns the messages to send; it never touches a
socket (``aggregator.service`` does), so a whole run can be driven in-process in tests. It does
write to disk, through the ledger and the checkpoint store, because durability is its job:

    select → assign → collect (until all results, or quorum at the deadline) → aggregate →
    checkpoint + ledger commit → evaluate (optional) → next round

An accepted update is stored (its payload in ``updates/``, its row in the ledger) *before* its
Ack is returned, and is folded into the method's running aggregate at once. After a crash the
engine restores the last committed global state, replays the open round's stored updates, and
carries on; task ids are a pure function of (run, round, kind, agent), so an agent's outboxed
result for the open round is recognised after the restart and never counted twice.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from aggregator.checkpoint import CheckpointStore, atomic_write_bytes
from aggregator.config import AggregatorConfig
from aggregator.errors import StateError, UpdateRejected
from aggregator.ledger import Ledger, RejectionRow, UpdateRow
from aggregator.methods import AgentView, ServerMethod
from aggregator.registry import Registry
from aggregator.rounds import Kind, Outgoing, Phase, RoundSummary, task_id_for, weighted
from protocol import PROTOCOL_VERSIONS
from protocol.errors import ErrorCode, VersionMismatch
from protocol.frames import Decoded, encode, frames_nbytes
from protocol.messages import (
    Ack,
    BaseModelRef,
    Bye,
    ErrorReply,
    Grant,
    Heartbeat,
    Hello,
    Quant,
    TaskAssign,
    TaskResult,
    Welcome,
    negotiate,
)

log = logging.getLogger(__name__)


class RoundEngine:
    def __init__(
        self,
        config: AggregatorConfig,
        method: ServerMethod,
        model: BaseModelRef,
        *,
        ledger: Ledger,
        store: CheckpointStore,
        clock: Callable[[], float] = time.monotonic,
        on_round: Callable[[RoundSummary], None] | None = None,
        driven: bool = False,
        on_phase: Callable[[str, int, list[TaskResult]], None] | None = None,
    ) -> None:
        """``driven``: a regional tier; phases open only when :meth:`drive` names one (the
        upstream's task) and ``on_phase(kind, round, results)`` is called as each closes."""
        self.config = config
        self.run = config.run
        self.method = method
        self.model = model
        self.ledger = ledger
        self.store = store
        self.clock = clock
        self.on_round = on_round or (lambda _s: None)
        self.registry = Registry(
            interval=config.server.heartbeat_interval, liveness=config.server.liveness
        )
        self.run_id = ""
        self.round = 0  # last committed round
        self.phase: Phase | None = None
        self.finished = False
        self.summaries: dict[int, RoundSummary] = {}
        self.update_dir = config.server.state_dir / "updates"
        self._last_beat = 0.0
        self._replayed: dict[str, TaskResult] = {}
        self._resume_assigned: list[str] = []
        self._refused: set[str] = set()
        self._ready: dict[str, str] = {}  # task id -> agent: large results waiting for a grant
        self._granted: dict[str, tuple[str, float]] = {}  # task id -> (agent, granted at)
        self.driven = driven
        self.on_phase = on_phase or (lambda _k, _r, _res: None)
        self._driven_task: tuple[Kind, int] | None = None
        self._begun_round = 0

    # --- start-up and resume ----------------------------------------------------------------

    def start(self) -> None:
        run = self.run
        self.run_id = run.run_id or self.ledger.latest_run() or f"run-{int(time.time())}"
        existing = self.ledger.run(self.run_id)
        if existing is not None and existing.get("method") != run.method:
            raise StateError(
                f"state dir holds run {self.run_id} of method {existing.get('method')}, "
                f"not {run.method}; use another state_dir or run_id"
            )
        self.ledger.create_run(self.run_id, run.method, self.config.model_dump(mode="json"))
        latest = self.store.latest()
        if latest is not None:
            tensors, manifest, _extra = self.store.load(latest)
            self.method.restore(tensors, manifest.meta)
            self.round = latest
            if self.ledger.last_committed_round(self.run_id) != latest:
                # crashed between the checkpoint and the ledger commit: finish the commit
                sha = manifest.files.get("global.safetensors", "")
                self.ledger.commit_round(self.run_id, latest, sha, {}, time.time())
            log.info("run %s resumes after committed round %d", self.run_id, latest)
        if self.round >= run.rounds:
            self.finished = True
            return
        self.method.begin_round(self.round + 1)
        self._begun_round = self.round + 1
        replayed = self._replay_open_round(self.round + 1)
        if replayed:
            log.info("round %d: replayed %d stored updates", self.round + 1, replayed)

    def _replay_open_round(self, round: int) -> int:
        begun = [r for r in self.ledger.rounds(self.run_id) if r.round == round]
        if begun:
            self._resume_assigned = list(begun[0].assigned)
        rows = self.ledger.updates(self.run_id, round)
        for row in rows:
            if row.blob_path is None:
                continue
            data = Path(row.blob_path).read_bytes()
            if hashlib.sha256(data).hexdigest() != row.sha256:
                raise StateError(f"stored update {row.blob_path} does not match its sha256")
            result = TaskResult(
                run_id=self.run_id,
                round=round,
                task_id=row.task_id,
                agent_id=row.agent_id,
                method=self.run.method,
                num_examples=row.num_examples,
                metrics=row.metrics,
            )
            self.method.add(self.method.validate(round, result, {"update": memoryview(data)}))
            self._replayed[row.agent_id] = result
        return len(rows)

    # --- inputs -------------------------------------------------------------------------------

    def on_message(self, agent_id: str, msg: Decoded, now: float) -> list[Outgoing]:
        header = msg.header
        if isinstance(header, Hello):
            return self._on_hello(agent_id, header, now)
        if not self.registry.known(agent_id):
            return [
                Outgoing(
                    agent_id,
                    ErrorReply(
                        code=ErrorCode.UNKNOWN_AGENT, reason="say Hello first", ref=header.msg_id
                    ),
                )
            ]
        self.registry.seen(agent_id, now)
        if isinstance(header, Heartbeat):
            return self._on_heartbeat(agent_id, header, msg)
        if isinstance(header, TaskResult):
            return self._on_result(agent_id, header, msg, now)
        if isinstance(header, ErrorReply):
            log.warning(
                "agent %s: %s %s (task %s)", agent_id, header.code, header.reason, header.task_id
            )
            if self.phase is not None and header.task_id in self.phase.assigned.values():
                self.registry.failed(agent_id, header.task_id)
            return []
        if isinstance(header, Bye):
            log.info("agent %s says bye: %s", agent_id, header.reason)
            self.registry.gone(agent_id)
            return []
        return [
            Outgoing(
                agent_id,
                ErrorReply(
                    code=ErrorCode.BAD_HEADER, reason=f"unexpected {header.type}", ref=header.msg_id
                ),
            )
        ]

    def _on_hello(self, agent_id: str, hello: Hello, now: float) -> list[Outgoing]:
        if hello.agent_id != agent_id:
            return [
                Outgoing(
                    agent_id,
                    ErrorReply(
                        code=ErrorCode.IDENTITY_MISMATCH,
                        reason=f"connection is {agent_id!r} but Hello claims {hello.agent_id!r}",
                        ref=hello.msg_id,
                    ),
                )
            ]
        try:
            version = negotiate(hello.versions, PROTOCOL_VERSIONS)
        except VersionMismatch as exc:
            return [
                Outgoing(agent_id, ErrorReply(code=exc.code, reason=str(exc), ref=hello.msg_id))
            ]
        if hello.models and self.model.sha256 not in hello.models:
            reason = (
                f"this run trains {self.model.name} (sha256 {self.model.sha256}); the agent holds "
                f"{', '.join(hello.models)}: give the agent that model (agent.model) or run "
                "it against another aggregator"
            )
            log.warning("agent %s refused: %s", agent_id, reason)
            return [Outgoing(agent_id, ErrorReply(code=ErrorCode.MODEL_MISMATCH, reason=reason,
                                                   ref=hello.msg_id))]  # fmt: skip
        self.registry.hello(agent_id, hello, now)
        self.ledger.upsert_agent(agent_id, hello.profile.model_dump(mode="json"), time.time())
        on_hello = getattr(self.method, "on_hello", None)
        if on_hello is not None:
            on_hello(self._view(agent_id))
        log.info(
            "agent %s joined (%d cpus, %.1f GFLOP/s fp32)",
            agent_id,
            hello.profile.cpus,
            hello.profile.matmul_gflops_fp32,
        )
        out = [
            Outgoing(
                agent_id,
                Welcome(
                    run_id=self.run_id,
                    round=self.round,
                    agent_id=agent_id,
                    version=version,
                    heartbeat_interval=self.config.server.heartbeat_interval,
                    liveness=self.config.server.liveness,
                    grant_above=self.config.server.grant_above_bytes
                    if self.config.server.upload_window > 0
                    else None,
                ),
            )
        ]
        phase = self.phase
        if phase is not None and agent_id in phase.assigned and agent_id not in phase.done:
            out.append(self._assignment(phase, agent_id))  # it may have lost the task
        return out

    def _on_heartbeat(self, agent_id: str, beat: Heartbeat, msg: Decoded) -> list[Outgoing]:
        self.registry.beat(agent_id, beat)
        acks: list[Outgoing] = []
        for task_id in beat.ready:
            if self.ledger.has_update(task_id):  # already durable: no need to send it again
                acks.append(Outgoing(agent_id, Ack(run_id=self.run_id, task_id=task_id)))
            elif task_id not in self._granted:
                self._ready.setdefault(task_id, agent_id)
        if beat.probe:
            echo = Heartbeat(run_id=self.run_id, round=self.round, echo=beat.msg_id)
            acks.append(Outgoing(agent_id, echo))
        return acks

    def _on_result(
        self, agent_id: str, res: TaskResult, msg: Decoded, now: float
    ) -> list[Outgoing]:
        def ack(accepted: bool = True) -> list[Outgoing]:
            return [
                Outgoing(
                    agent_id,
                    Ack(
                        run_id=self.run_id, round=res.round, task_id=res.task_id, accepted=accepted
                    ),
                )
            ]

        def error(code: ErrorCode, reason: str) -> list[Outgoing]:
            return [
                Outgoing(
                    agent_id,
                    ErrorReply(
                        run_id=self.run_id,
                        round=res.round,
                        code=code,
                        reason=reason,
                        ref=res.msg_id,
                        task_id=res.task_id,
                    ),
                )
            ]

        if res.agent_id != agent_id:
            return error(ErrorCode.IDENTITY_MISMATCH, f"result claims agent {res.agent_id!r}")
        self._granted.pop(res.task_id, None)
        self._ready.pop(res.task_id, None)
        phase = self.phase
        if res.kind == "train" and self.ledger.has_update(res.task_id):
            return ack()  # a retry of something already durable: Ack again, count once
        if (
            phase is None
            or res.kind != phase.kind
            or res.round != phase.round
            or phase.assigned.get(agent_id) != res.task_id
            or res.run_id != self.run_id
        ):
            return error(
                ErrorCode.STALE_TASK, f"task {res.task_id} is not open (round {self.round})"
            )
        if agent_id in phase.done:
            return ack()
        if res.kind == "eval":
            phase.done[agent_id] = res
            phase.bytes_up[agent_id] = msg.nbytes
            return ack()
        if res.kind == "score":
            phase.done[agent_id] = res
            phase.bytes_up[agent_id] = msg.nbytes
            try:
                self.method.add_score(res.round, res, msg.blobs)  # type: ignore[attr-defined]
            except UpdateRejected as exc:
                phase.rejected += 1
                log.warning("round %d: rejected scores from %s: %s", res.round, agent_id, exc)
                return error(ErrorCode.REJECTED_UPDATE, exc.reason)
            return ack()
        try:
            update = self.method.validate(res.round, res, msg.blobs)
        except UpdateRejected as exc:
            phase.rejected += 1
            phase.done[agent_id] = res  # answered, just not counted
            self.ledger.record_rejection(
                RejectionRow(
                    run_id=self.run_id,
                    round=res.round,
                    task_id=res.task_id,
                    agent_id=agent_id,
                    code=str(exc.code),
                    reason=exc.reason,
                    at=time.time(),
                )
            )
            log.warning("round %d: rejected update from %s: %s", res.round, agent_id, exc.reason)
            return error(ErrorCode.REJECTED_UPDATE, exc.reason)
        blob = msg.blobs.get("update")
        blob_path = None
        sha = ""
        if blob is not None:
            target = self.update_dir / self.run_id / f"round-{res.round:06d}"
            target.mkdir(parents=True, exist_ok=True)
            blob_path = target / f"{res.task_id}.safetensors"
            atomic_write_bytes(blob_path, blob)
            # frames.decode already checked this blob against the sha256 its header lists
            sha = next(ref.sha256 for ref in res.blobs if ref.name == "update")
        row = UpdateRow(
            run_id=self.run_id,
            round=res.round,
            task_id=res.task_id,
            agent_id=agent_id,
            sha256=sha,
            num_examples=res.num_examples,
            metrics=dict(res.metrics),
            bytes_up=msg.nbytes,
            bytes_down=phase.bytes_down.get(agent_id, 0),
            received_at=time.time(),
            blob_path=str(blob_path) if blob_path else None,
        )
        if self.ledger.record_update(row):
            self.method.add(update)
            log.info(
                "round %d: accepted update from %s (%d examples, %d bytes up, %d bytes down)",
                res.round, agent_id, res.num_examples, msg.nbytes, row.bytes_down,
            )  # fmt: skip
        phase.done[agent_id] = res
        phase.bytes_up[agent_id] = msg.nbytes
        return ack()

    # --- the clock ----------------------------------------------------------------------------

    def tick(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        for agent_id in self.registry.expire(now):
            log.warning("agent %s expired (no message for %.1fs)", agent_id, self.registry.window)
        if now - self._last_beat >= self.config.server.heartbeat_interval:
            self._last_beat = now
            out += [
                Outgoing(a, Heartbeat(run_id=self.run_id, round=self.round))
                for a in self.registry.live()
            ]
        out += self._grants(now)
        if self.finished:
            return out
        if self.phase is None:
            out += self._maybe_start(now)
        elif self._phase_complete(self.phase, now):
            out += self._close_phase(self.phase, now)
        return out

    def _grants(self, now: float) -> list[Outgoing]:
        """Let waiting large results travel, at most ``upload_window`` at a time."""
        server = self.config.server
        for task_id, (agent_id, at) in list(self._granted.items()):
            if now - at > server.grant_timeout_s or not self.registry.is_live(agent_id):
                del self._granted[task_id]  # it will ask again if it still holds the result
        out = []
        while self._ready and len(self._granted) < server.upload_window:
            task_id = next(iter(self._ready))
            agent_id = self._ready.pop(task_id)
            if not self.registry.is_live(agent_id):
                continue
            self._granted[task_id] = (agent_id, now)
            out.append(Outgoing(agent_id, Grant(run_id=self.run_id, task_id=task_id)))
        return out

    def _admissible(self, agents: list[str]) -> list[str]:
        """Agents the method can run on; a refusal is logged once per agent with its reason."""
        admit = getattr(self.method, "admit", None)
        if admit is None:
            return agents
        out = []
        for agent_id in agents:
            reason = admit(agent_id, self.registry.agents[agent_id].profile)
            if reason is None:
                out.append(agent_id)
            elif agent_id not in self._refused:
                self._refused.add(agent_id)
                log.warning("agent %s not assigned %s: %s", agent_id, self.run.method, reason)
        return out

    def _view(self, agent_id: str) -> AgentView:
        a = self.registry.agents[agent_id]
        return AgentView(
            agent_id=agent_id,
            profile=a.profile,
            holds=frozenset(a.holds),
            rtt_ms=a.rtt_ms,
            bandwidth_mbps=a.bandwidth_mbps,
            role=a.role,
        )

    def drive(self, kind: Kind, round: int) -> None:
        """Open a ``kind`` phase of ``round`` as soon as enough agents are live (driven mode)."""
        if not self.driven:
            raise StateError("drive() is for a regional tier's engine")
        if self.phase is not None and (self.phase.kind, self.phase.round) == (kind, round):
            return  # already open: a re-sent upstream task
        if kind == "train" and round != self._begun_round:
            self.method.begin_round(round)
            self._begun_round = round
        self._driven_task = (kind, round)

    def _maybe_start(self, now: float) -> list[Outgoing]:
        live = self._admissible(self.registry.live(model=self.model.sha256))
        if len(live) < self.run.min_agents:
            return []
        if self.driven:
            if self._driven_task is None:
                return []
            kind, round = self._driven_task
            self._driven_task = None
            if kind == "train" and self._resume_assigned:
                live, self._resume_assigned = self._resume_assigned, []
            return self._open_phase(kind, round, live, now)
        if self.round == 0 and self.run.eval and self.run.eval_initial and 0 not in self.summaries:
            return self._open_phase("eval", 0, live, now)
        wants_score = getattr(self.method, "wants_score", None)
        if wants_score is not None and wants_score(self.round + 1):
            return self._open_phase("score", self.round + 1, live, now)
        if self._resume_assigned:  # the open round of a restarted run keeps its agents
            chosen, self._resume_assigned = self._resume_assigned, []
        else:
            count = max(self.run.min_agents, math.ceil(self.run.fraction * len(live)))
            rng = random.Random(f"{self.run_id}|{self.run.seed}|{self.round + 1}")
            chosen = sorted(rng.sample(sorted(live), min(count, len(live))))
        return self._open_phase("train", self.round + 1, chosen, now)

    def _open_phase(self, kind: Kind, round: int, agents: list[str], now: float) -> list[Outgoing]:
        assigned = {a: task_id_for(self.run_id, round, kind, a) for a in agents}
        self.phase = Phase(
            kind=kind,
            round=round,
            assigned=assigned,
            started=now,
            deadline=now + self.run.round_deadline_s,
        )
        if kind == "train":
            self.ledger.begin_round(self.run_id, round, self.run.method, agents, time.time())
            for agent_id, result in self._replayed.items():
                if assigned.get(agent_id) == result.task_id:
                    self.phase.done[agent_id] = result
            self._replayed = {}
        log.info("round %d %s: assigned %d agents", round, kind, len(agents))
        plan = getattr(self.method, "plan", None)
        if plan is not None:
            plan(round, kind, {a: self._view(a) for a in agents if a in self.registry.agents})
        live = set(self.registry.live())
        return [
            self._assignment(self.phase, a)
            for a in agents
            if a not in self.phase.done and a in live
        ]

    def _assignment(self, phase: Phase, agent_id: str) -> Outgoing:
        spec = self.method.assign(phase.round, agent_id, phase.kind)
        header = TaskAssign(
            run_id=self.run_id,
            round=phase.round,
            task_id=phase.assigned[agent_id],
            kind=phase.kind,
            method=self.run.method,
            model=self.model,
            quant=cast(Quant, spec.quant or self.run.quant),
            params=spec.params,
            deadline_s=max(1.0, phase.deadline - self.clock()),
        )
        phase.bytes_down[agent_id] = frames_nbytes(encode(header, spec.blobs))
        self.registry.assigned(agent_id, phase.assigned[agent_id])
        return Outgoing(agent_id, header, spec.blobs)

    def _phase_complete(self, phase: Phase, now: float) -> bool:
        pending = [
            a
            for a in phase.assigned
            if a not in phase.done and not self.registry.has_failed(a, phase.assigned[a])
        ]
        if not pending:
            return True
        quorum = max(1, math.ceil(self.run.quorum * len(phase.assigned)))
        if len(phase.done) >= quorum and not any(self.registry.is_live(a) for a in pending):
            log.warning(
                "round %d %s: dropping agents that went silent: %s",
                phase.round,
                phase.kind,
                pending,
            )
            return True
        if now < phase.deadline:
            return False
        if len(phase.done) >= quorum:
            log.warning(
                "round %d %s: deadline passed, dropping stragglers %s",
                phase.round,
                phase.kind,
                pending,
            )
            return True
        phase.deadline = now + self.run.round_deadline_s
        log.warning(
            "round %d %s: deadline passed below quorum (%d/%d); extended",
            phase.round,
            phase.kind,
            len(phase.done),
            quorum,
        )
        return False

    def _close_phase(self, phase: Phase, now: float) -> list[Outgoing]:
        self.phase = None
        results = list(phase.done.values())
        n = max(len(phase.assigned), 1)
        if phase.kind == "score":
            summary = self.summaries.setdefault(phase.round, RoundSummary(round=phase.round))
            metrics = self.method.finish_score(phase.round)  # type: ignore[attr-defined]
            summary.method.update({k: float(v) for k, v in metrics.items() if math.isfinite(v)})
            log.info("round %d scores in from %d agents", phase.round, len(results))
            if self.driven:
                self.on_phase(phase.kind, phase.round, results)
                return []
            return self._maybe_start(now)
        if phase.kind == "train":
            summary = self.summaries.setdefault(phase.round, RoundSummary(round=phase.round))
            metrics = self.method.finish_round(phase.round)
            summary.agents = len(results) - phase.rejected
            summary.train_loss = weighted(results, "train_loss")
            summary.bytes_up = sum(phase.bytes_up.values()) / max(len(phase.bytes_up), 1)
            summary.bytes_down = sum(phase.bytes_down.values()) / n
            summary.seconds = now - phase.started
            summary.rejected = phase.rejected
            summary.method.update({k: float(v) for k, v in metrics.items() if math.isfinite(v)})
            summary.per_agent = self._per_agent(phase)
            tensors, meta = self.method.state()
            manifest = self.store.save(
                phase.round, tensors, method=self.run.method, meta={**meta, "run_id": self.run_id}
            )
            self.ledger.commit_round(
                self.run_id,
                phase.round,
                manifest.files.get("global.safetensors", ""),
                {**summary.as_metrics(), **summary.method},
                time.time(),
            )
            self.round = phase.round
            # the round's stored updates were only needed to replay it after a crash
            if not self.config.server.keep_updates:
                shutil.rmtree(self.update_dir / self.run_id / f"round-{phase.round:06d}", True)
            log.info("round %d committed (%d updates)", phase.round, summary.agents)
            if self.driven:
                self.on_round(summary)
                self.on_phase(phase.kind, phase.round, results)
                return []
            if self.run.eval:
                live = [a for a in self.registry.live(model=self.model.sha256)]
                if live:
                    return self._open_phase("eval", phase.round, live, now)
            self._round_done(summary)
        else:
            summary = self.summaries.setdefault(phase.round, RoundSummary(round=phase.round))
            summary.eval_loss = weighted(results, "eval_loss")
            summary.eval_em = weighted(results, "eval_em")
            # what evaluating this round's global cost on the wire (it may carry state the next
            # round needs: Ferret's step, FedBiOT's emulator with the round-0 evaluation)
            summary.eval_bytes_up = sum(phase.bytes_up.values()) / n
            summary.eval_bytes_down = sum(phase.bytes_down.values()) / n
            if self.driven:
                self.on_phase(phase.kind, phase.round, results)
                return []
            if phase.round > 0:
                self.ledger.set_round_metrics(self.run_id, phase.round, summary.as_metrics())
            self._round_done(summary)
        return []

    def _per_agent(self, phase: Phase) -> dict[str, dict[str, str]]:
        details = getattr(self.method, "agent_details", None)
        chosen: dict[str, dict[str, str]] = details(phase.round) if details is not None else {}
        out: dict[str, dict[str, str]] = {}
        for agent_id in sorted(phase.assigned):
            row = {
                "up": str(phase.bytes_up.get(agent_id, 0)),
                "down": str(phase.bytes_down.get(agent_id, 0)),
                **chosen.get(agent_id, {}),
            }
            out[agent_id] = row
        return out

    def _round_done(self, summary: RoundSummary) -> None:
        self.on_round(summary)
        if summary.round > 0:
            if self.round >= self.run.rounds:
                self.finished = True
                log.info("run %s finished after %d rounds", self.run_id, self.round)
            else:
                self.method.begin_round(self.round + 1)
                self._begun_round = self.round + 1

    def goodbye(self) -> list[Outgoing]:
        return [
            Outgoing(a, Bye(run_id=self.run_id, round=self.round, reason="run finished"))
            for a in self.registry.live()
        ]

    def status(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "method": self.run.method,
            "round": self.round,
            "rounds": self.run.rounds,
            "phase": None
            if self.phase is None
            else {
                "kind": self.phase.kind,
                "round": self.phase.round,
                "assigned": len(self.phase.assigned),
                "done": len(self.phase.done),
            },
            "finished": self.finished,
            "agents": self.registry.describe(),
        }
