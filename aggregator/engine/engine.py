"""The round engine: a sans-IO state machine that runs a federated run.

It takes decoded messages and the time, and returns the messages to send; it never touches a
socket (``aggregator.engine.service`` does), so a whole run can be driven in-process in tests. It does
write to disk, through the ledger and the checkpoint store, because durability is its job:

    select → assign → collect (until all results, or quorum at the deadline) → aggregate →
    checkpoint + ledger commit → evaluate (optional) → next round

An accepted update is stored (its payload in the round's update log, its row in the ledger)
*before* its Ack is returned, and is folded into the method's running aggregate then. The
service takes what has arrived as one group (:meth:`RoundEngine.group`): one sync and one ledger
transaction for all of it, then its Acks. After a crash the
engine restores the last committed global state, replays the open round's stored updates, and
carries on; task ids are a pure function of (run, round, kind, agent), so an agent's outboxed
result for the open round is recognised after the restart and never counted twice.

:class:`RoundEngine` coordinates: it routes messages, runs the clock, and opens and closes
phases. The parts with a job of their own are collaborators it holds, none of which sends:
:class:`~aggregator.engine.admission.Admission` (who may join; whom the method can use),
:class:`~aggregator.engine.uploads.UploadWindow` (which large results may travel now),
:class:`~aggregator.engine.intake.ResultIntake` (validating, storing and replaying results),
:class:`~aggregator.engine.phases.PhaseRules` (who is chosen; when a phase may close) and
:class:`~aggregator.engine.commits.RoundCommits` (checkpoint + ledger commit; restoring them;
the ledger's evaluation rows).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from aggregator.engine import crashpoints
from aggregator.engine.admission import Admission
from aggregator.engine.commits import RoundCommits
from aggregator.engine.intake import ResultIntake, ack, refusal
from aggregator.engine.phases import PhaseRules
from aggregator.engine.registry import Registry
from aggregator.engine.rounds import (
    SIDE_EVAL_KEYS,
    Kind,
    Outgoing,
    Phase,
    RoundSummary,
    eval_limit,
    task_id_for,
)
from aggregator.engine.uploads import UploadWindow, grant_above
from aggregator.errors import StateError
from aggregator.methods import ServerMethod
from aggregator.ops.config import AggregatorConfig
from aggregator.store.checkpoint import CheckpointStore
from aggregator.store.ledger import Ledger
from protocol.errors import ErrorCode
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
)

__all__ = ["Outgoing", "RoundEngine", "RoundSummary"]

log = logging.getLogger(__name__)

BLOCKED_LOG_EVERY_S = 300.0
"""How often a run that cannot start says so again while nothing changes."""


class RoundEngine:
    """One federated run: messages and the clock in, the messages to send out."""

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
        self.admission = Admission(
            self.registry, ledger, model, self.run.method, frozenset(config.security.regions)
        )
        self.uploads = UploadWindow(self.registry.is_live)
        self.rules = PhaseRules(self.run, self.registry)
        self.commits = RoundCommits(ledger, store)
        self.intake = ResultIntake(ledger, config.server.state_dir / "updates", self.run.method)
        self._last_beat = 0.0
        self._replayed: dict[str, TaskResult] = {}
        self._resume_assigned: list[str] = []
        self.driven = driven
        self.on_phase = on_phase or (lambda _k, _r, _res: None)
        self._driven_task: tuple[Kind, int] | None = None
        self._begun_round = 0
        self._score_phases: dict[int, int] = {}
        self.blocked: str | None = None
        """Why no phase can open although enough agents are live (see :meth:`_note_blocked`)."""
        self._blocked_logged = 0.0
        self._held_train: Phase | None = None
        """A closed training phase waiting for the reveal phase after it (``reveal_agents``)."""
        self._grouping = 0
        self._eval_due = 0

    # --- start-up and resume ----------------------------------------------------------------

    def start(self) -> None:
        self.run_id = self.commits.open_run(self.run, self.config.model_dump(mode="json"))
        latest = self.commits.restore(self.method, self.run_id)
        if latest is not None:
            self.round = latest
        self._eval_due = self.commits.lost_eval(self.run, self.run_id, self.round, self.driven)
        stop = getattr(self.method, "should_stop", None)
        if self.round >= self.run.rounds or (stop is not None and stop(self.round + 1)):
            self.finished = not self._eval_due
            return
        self.method.begin_round(self.round + 1)
        self._begun_round = self.round + 1
        begun = [r for r in self.ledger.rounds(self.run_id) if r.round == self.round + 1]
        if begun:  # the open round of a crashed run: its agents, and what they had sent
            self._resume_assigned = list(begun[0].assigned)
        self._replayed.update(self.intake.replay(self.method, self.run_id, self.round + 1))

    # --- inputs -------------------------------------------------------------------------------

    @contextmanager
    def group(self, overlap: bool = False) -> Iterator[list[Outgoing]]:
        """Messages handled inside are one group: their updates become durable together when
        the block ends (one log sync, one ledger transaction), and only then are their Acks
        added to the yielded list, to be sent. Outside a group each update is its own.

        ``overlap``: the block's end does not wait for the group's sync. It finishes the group
        sealed before (its Acks are what the list gets) and seals this one
        (:meth:`ResultIntake.seal`): its sync runs while the caller takes the next group, and
        its Acks come with the next group's end or the next :meth:`flush` (every other input
        flushes first: :meth:`tick`, a message outside a group). When the group sealed before
        is still syncing (the disk is the slower part), the block's end does not wait for it
        either: this group stays open, and the next block's messages join it (fewer, larger
        groups; the loop goes on validating while the disk writes). A caller with nothing more
        to take calls :meth:`flush`."""
        acks: list[Outgoing] = []
        self._grouping += 1
        try:
            yield acks
        finally:
            self._grouping -= 1
        if not self._grouping:
            if overlap:
                if not self.intake.synced():
                    return  # the group before still syncs: this one stays open (see above)
                round = self._group_round()
                acks += self._answered(self.intake.finish(self.run_id), round)
                self.intake.seal()
            else:
                acks += self.flush()

    @property
    def syncing(self) -> bool:
        """Whether a group sealed by :meth:`group` (``overlap``) awaits its :meth:`flush`."""
        return self.intake.sealed is not None

    def flush(self) -> list[Outgoing]:
        """Commit the sealed and the pending group (see :meth:`ResultIntake.commit`); the Acks
        now due."""
        round = self._group_round()
        return self._answered(self.intake.commit(self.run_id), round)

    def _group_round(self) -> int:
        """The round of the group to be committed next (0: none)."""
        group = self.intake.sealed[0] if self.intake.sealed is not None else self.intake.pending
        return group[0][0].round if group else 0

    def _answered(self, answers: list[Outgoing], round: int) -> list[Outgoing]:
        if answers:
            crashpoints.reached("stored", round)
            crashpoints.reached_after("acked", round, self.config.server.heartbeat_interval)
        return answers

    def on_message(self, agent_id: str, msg: Decoded, now: float) -> list[Outgoing]:
        header = msg.header
        if isinstance(header, Hello):
            return self._on_hello(agent_id, header, now)
        if not self.registry.known(agent_id):
            error = ErrorReply(
                code=ErrorCode.UNKNOWN_AGENT, reason="say Hello first", ref=header.msg_id
            )
            return [Outgoing(agent_id, error)]
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
        reason = f"unexpected {header.type}"
        error = ErrorReply(code=ErrorCode.BAD_HEADER, reason=reason, ref=header.msg_id)
        return [Outgoing(agent_id, error)]

    def _on_hello(self, agent_id: str, hello: Hello, now: float) -> list[Outgoing]:
        version = self.admission.hello(self.method, agent_id, hello, now)
        if isinstance(version, ErrorReply):
            return [Outgoing(agent_id, version)]
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
                    grant_above=grant_above(self.config.server),
                ),
            )
        ]
        phase = self.phase
        if self.finished:  # a lobby between runs: the agent learns this run is over
            out.append(Outgoing(agent_id, Bye(run_id=self.run_id, reason="run is over")))
        elif phase is not None and agent_id in phase.assigned and agent_id not in phase.done:
            out.append(self._assignment(phase, agent_id))  # it may have lost the task
        return out

    def _on_heartbeat(self, agent_id: str, beat: Heartbeat, msg: Decoded) -> list[Outgoing]:
        self.registry.beat(agent_id, beat)
        phase = self.phase
        if phase is not None and beat.progress > 0 and beat.task_id == phase.assigned.get(agent_id):
            crashpoints.reached("training", phase.round)
        open_task = None
        if phase is not None and agent_id not in phase.done:
            open_task = phase.assigned.get(agent_id)
        told = self.uploads.announce(
            agent_id, beat.ready, self.ledger.has_update, open_task, phase_open=phase is not None
        )
        acks = [Outgoing(agent_id, Ack(run_id=self.run_id, task_id=t)) for t in told.stored]
        for task_id in told.stale:
            reason = f"task {task_id} is not open (round {self.round})"
            stale = ErrorReply(
                run_id=self.run_id, code=ErrorCode.STALE_TASK, reason=reason, task_id=task_id
            )
            acks.append(Outgoing(agent_id, stale))
        if beat.probe:
            echo = Heartbeat(run_id=self.run_id, round=self.round, echo=beat.msg_id)
            acks.append(Outgoing(agent_id, echo))
        return acks

    def _on_result(
        self, agent_id: str, res: TaskResult, msg: Decoded, now: float
    ) -> list[Outgoing]:
        run_id = self.run_id
        if res.agent_id != agent_id:
            reason = f"result claims agent {res.agent_id!r}"
            return refusal(run_id, agent_id, res, ErrorCode.IDENTITY_MISMATCH, reason)
        self.uploads.arrived(res.task_id, agent_id)
        phase = self.phase
        if res.kind == "train" and self.intake.is_pending(res.task_id):
            return []  # a retry of an update in the open group: its Ack comes with the group
        if res.kind == "train" and self.ledger.has_update(res.task_id):
            # a retry of something already durable: Ack again, count once
            return ack(run_id, agent_id, res)
        if (
            phase is None
            or res.kind != phase.kind
            or res.round != phase.round
            or phase.assigned.get(agent_id) != res.task_id
            or res.run_id != self.run_id
        ):
            reason = f"task {res.task_id} is not open (round {self.round})"
            return refusal(run_id, agent_id, res, ErrorCode.STALE_TASK, reason)
        if agent_id not in phase.done:
            crashpoints.poll(phase.round, now=True)  # "acked": before the next result counts
            crashpoints.reached("upload", phase.round)
            rejected = self.intake.take(self.method, phase, agent_id, res, msg)
            if rejected is not None:
                return refusal(run_id, agent_id, res, ErrorCode.REJECTED_UPDATE, rejected)
            if self.intake.pending:  # its Ack only once it is durable: with the group
                return [] if self._grouping else self.flush()
        return ack(run_id, agent_id, res)

    # --- the clock ----------------------------------------------------------------------------

    def tick(self, now: float) -> list[Outgoing]:
        crashpoints.poll(None if self.phase is None else self.phase.round)
        out: list[Outgoing] = [] if self._grouping else self.flush()  # nothing closes undurable
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
        elif self.rules.complete(self.phase, now):
            out += self._close_phase(self.phase, now)
        return out

    def _grants(self, now: float) -> list[Outgoing]:
        """Let waiting large results travel, at most ``upload_window`` at a time."""
        server = self.config.server
        granted = self.uploads.grants(
            now, window=server.upload_window, timeout_s=server.grant_timeout_s
        )
        return [Outgoing(a, Grant(run_id=self.run_id, task_id=t)) for a, t in granted]

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
        joined = self.registry.live(model=self.model.sha256)
        live = self.admission.assignable(self.method, joined)
        if len(live) < self.run.min_agents:
            self._note_blocked(now, joined, live)
            return []
        self.blocked = None
        if self.driven:
            if self._driven_task is None:
                return []
            kind, round = self._driven_task
            self._driven_task = None
            if kind == "train" and self._resume_assigned:
                live, self._resume_assigned = self._resume_assigned, []
            return self._open_phase(kind, round, live, now)
        if self._eval_due:  # a restart lost the last committed round's evaluation: redo it
            round, self._eval_due = self._eval_due, 0
            return self._open_phase("eval", round, live, now)
        if self.round == 0 and self.run.eval and self.run.eval_initial and 0 not in self.summaries:
            return self._open_phase("eval", 0, live, now)
        wants_score = getattr(self.method, "wants_score", None)
        if wants_score is not None and wants_score(self.round + 1):
            return self._open_phase("score", self.round + 1, live, now)
        if self._resume_assigned:  # the open round of a restarted run keeps its agents
            chosen, self._resume_assigned = self._resume_assigned, []
        else:
            chosen = self.rules.choose(self.run_id, self.round + 1, live)
        return self._open_phase("train", self.round + 1, chosen, now)

    def _note_blocked(self, now: float, joined: list[str], live: list[str]) -> None:
        """Say why no phase opens although enough agents are live: the method refuses some of
        them (their hardware cannot run it). Set as :attr:`blocked` (in :meth:`status`; a
        ``local`` run, whose agents are all there, stops on it) and logged as a warning when it
        changes and every :data:`BLOCKED_LOG_EVERY_S` while it lasts (a service may yet get
        other agents, so it waits)."""
        refused = self.admission.refusals(joined)
        if len(joined) < self.run.min_agents or not refused:
            self.blocked = None  # an ordinary wait for agents to join (or a passing one)
            return
        reasons = "; ".join(f"{a}: {r}" for a, r in sorted(refused.items()))
        blocked = (
            f"round {self.round + 1} needs {self.run.min_agents} agents (run.min_agents) and "
            f"{self.run.method} can use {len(live)} of the {len(joined)} live ones; refused: "
            f"{reasons}"
        )
        if blocked != self.blocked or now - self._blocked_logged >= BLOCKED_LOG_EVERY_S:
            log.warning("cannot start: %s", blocked)
            self._blocked_logged = now
        self.blocked = blocked

    def _open_phase(self, kind: Kind, round: int, agents: list[str], now: float) -> list[Outgoing]:
        label: str = kind
        if kind == "score":  # a round may hold several score phases (secure aggregation)
            seq = self._score_phases.get(round, 0)
            self._score_phases[round] = seq + 1
            label = f"score{seq}" if seq else kind
        relabel = getattr(self.method, "task_label", None)  # secure aggregation: per attempt
        if relabel is not None:
            label = relabel(kind, label)
        assigned = {a: task_id_for(self.run_id, round, label, a) for a in agents}
        self.phase = Phase(
            kind=kind,
            round=round,
            assigned=assigned,
            started=now,
            deadline=now + self.run.round_deadline_s,
        )
        if kind == "train":
            self.ledger.begin_round(self.run_id, round, self.run.method, agents, time.time())
            self.intake.open_log(self.run_id, round)  # created (and its folder synced) now
            crashpoints.reached("assign", round)
            for agent_id, result in self._replayed.items():
                if assigned.get(agent_id) == result.task_id:
                    self.phase.done[agent_id] = result
            self._replayed = {}
        log.info("round %d %s: assigned %d agents", round, kind, len(agents))
        plan = getattr(self.method, "plan", None)
        if plan is not None:
            plan(
                round,
                kind,
                {a: self.admission.view(a) for a in agents if a in self.registry.agents},
            )
        live = set(self.registry.live())
        return [
            self._assignment(self.phase, a)
            for a in agents
            if a not in self.phase.done and a in live
        ]

    def _assignment(self, phase: Phase, agent_id: str) -> Outgoing:
        spec = self.method.assign(phase.round, agent_id, phase.kind)
        if phase.kind == "eval" and agent_id not in self.admission.regions:
            # the agent evaluates on at most this many examples (a regional tier answers with
            # its agents' total)
            phase.limits[agent_id] = eval_limit(spec.params)
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
        frames = encode(header, spec.blobs)  # once: the service sends these very frames
        phase.bytes_down[agent_id] = frames_nbytes(frames)
        self.registry.assigned(agent_id, phase.assigned[agent_id])
        return Outgoing(agent_id, header, spec.blobs, encoded=frames)

    def _close_phase(self, phase: Phase, now: float) -> list[Outgoing]:
        self.phase = None
        results = phase.counted()  # the rejected ones' metrics count nowhere
        summary = self.summaries.setdefault(phase.round, RoundSummary(round=phase.round))
        if phase.kind == "score":
            metrics = self.method.finish_score(phase.round)  # type: ignore[attr-defined]
            summary.record_method(metrics)
            log.info("round %d scores in from %d agents", phase.round, len(results))
            if self._held_train is not None:  # a reveal phase closed: now the round's train
                held, self._held_train = self._held_train, None
                return self._close_phase(held, now)
            if self.driven:
                self.on_phase(phase.kind, phase.round, results)
                return []
            return self._maybe_start(now)
        if phase.kind == "train":
            reveal = getattr(self.method, "reveal_agents", None)  # secure aggregation: unmask
            agents = reveal(phase.round) if reveal is not None else None
            if agents is not None:
                self._held_train = phase
                alive = set(self.registry.live())
                return self._open_phase(
                    "score", phase.round, [a for a in agents if a in alive], now
                )
            summary.record_method(self.method.finish_round(phase.round))
            details = getattr(self.method, "agent_details", None)
            summary.record_train(phase, now, details(phase.round) if details is not None else {})
            self.commits.commit(self.method, self.run.method, self.run_id, summary)
            self.round = phase.round
            # the round's stored updates were only needed to replay it after a crash
            if not self.config.server.keep_updates:
                self.intake.discard(self.run_id, phase.round)
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
            summary.record_eval(phase)
            self.commits.record_eval(self.run_id, phase, summary)
            if self.driven:
                self.on_phase(phase.kind, phase.round, results)
                return []
            if phase.round > 0:  # the train metrics are committed already: add the eval's
                evals = {
                    k: v
                    for k, v in summary.as_metrics().items()
                    if k.startswith("eval_") or k in SIDE_EVAL_KEYS  # eval_truncated_* too
                }
                self.ledger.set_round_metrics(self.run_id, phase.round, evals)
            else:
                self.ledger.put_state(self.run_id, "baseline", summary.as_metrics())
            self._round_done(summary)
        return []

    def _round_done(self, summary: RoundSummary) -> None:
        self.on_round(summary)
        if summary.round > 0:
            stop = getattr(self.method, "should_stop", None)  # e.g. DP's target ε
            if self.round >= self.run.rounds or (stop is not None and stop(self.round + 1)):
                self.finished = True
                log.info("run %s finished after %d rounds", self.run_id, self.round)
            elif self._begun_round != self.round + 1:  # (begun already after a restart)
                self.method.begin_round(self.round + 1)
                self._begun_round = self.round + 1

    def goodbye(self, reason: str = "run finished") -> list[Outgoing]:
        """A Bye naming this run to every live agent: the run is over (agents of a serving
        aggregator stay connected for the next one)."""
        return [
            Outgoing(a, Bye(run_id=self.run_id, round=self.round, reason=reason))
            for a in self.registry.live()
        ]

    def close(self) -> None:
        """The run is over here: a group still syncing recorded and counted (its Acks are not
        sent: the agents resend, and are acknowledged as duplicates), its update log closed,
        the method's threads (if any) stopped."""
        try:
            self.intake.finish(self.run_id)
        finally:
            self.intake.close()
        close = getattr(self.method, "close", None)
        if close is not None:
            close()

    def status(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "method": self.run.method,
            "round": self.round,
            "rounds": self.run.rounds,
            "phase": None if self.phase is None else self.phase.describe(),
            "finished": self.finished,
            "agents": self.registry.describe(),
            "blocked": self.blocked,
        }
