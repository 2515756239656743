"""Which run a serving aggregator runs now, and what it is waiting for.

:class:`Lifecycle` is what ``edgefed-aggregator serve`` adds to the service loop: it makes the
next queued run active when the active one ends, ends a run that is stopped, marks each run's
end in the ledger (finished / failed with the error / stopped), exports a finished run whose
``run.export_dir`` is set, and records what the active run is doing (``service`` state in the
ledger, which ``status`` shows): running a phase and waiting for which agents since when, or
waiting for enough agents to start. Every change of that is logged once.

Between runs (and when the queue is empty) the last run's engine stays in place as the lobby:
it welcomes agents and answers their heartbeats, and tells each that its run is over (a ``Bye``
with the run id, which an agent answers by waiting, connected). When the next run starts its
engine knows no agent yet; each agent's next heartbeat gets ``UNKNOWN_AGENT`` and the agent
says ``Hello`` again to the new run, whose admission checks its model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aggregator.engine.engine import Outgoing, RoundEngine
from aggregator.errors import AggregatorError, StateError
from aggregator.ops.config import AggregatorConfig
from aggregator.runs.state import ENDED, SERVICE, RunBook
from aggregator.store.ledger import RUN_SECTIONS, differences

log = logging.getLogger(__name__)

EngineFactory = Callable[[AggregatorConfig, bool], RoundEngine]
"""Builds the engine of a run's config; ``True``: start it (else: a lobby that never runs)."""


class Lifecycle:
    def __init__(self, book: RunBook, build: EngineFactory, export: Callable[[RoundEngine], Any]):
        self.book = book
        self.build = build
        self.export = export
        self.engine: RoundEngine | None = None
        self.service: AggregatorConfig | None = None
        """``serve``'s config file: its ``[server]`` and ``[security]`` apply to every run."""
        self.active: str | None = None  # the run whose engine runs (None: the engine is a lobby)
        self._doing: tuple[Any, ...] = ()

    # --- start-up ---------------------------------------------------------------------------

    def adopt(self, config: AggregatorConfig) -> RoundEngine:
        """Take the run of ``serve``'s config file; the engine to serve with first."""
        ledger = self.book.ledger
        run_id = config.run.run_id or ledger.latest_run() or f"run-{int(time.time())}"
        config = config.model_copy(update={"run": config.run.model_copy(update={"run_id": run_id})})
        self.service = config
        if ledger.run(run_id) is None:
            self.book.submit(config)
        info = self.book.info(run_id)
        if info.status not in ENDED:
            self._warn_changed(run_id, config)
        if info.status in ENDED:
            why = f": {info.reason}" if info.reason else ""
            log.info("run %s is %s%s; waiting for the next submitted run", run_id, info.status, why)
        nxt = self.book.next_run()
        if nxt is not None and (nxt != run_id or info.status not in ENDED):
            engine = self._activate(nxt)
            if engine is not None:
                return engine
        return self._lobby(self.book.run_config(config, run_id))

    # --- the loop ---------------------------------------------------------------------------

    def step(self, now: float) -> list[Outgoing]:
        """After each engine tick: end the active run if it finished, start the next one."""
        engine = self.engine
        assert engine is not None
        out: list[Outgoing] = []
        if self.active is not None and engine.finished:
            out += self._end(self.active, "finished", f"{engine.round} rounds")
        if self.active is None:
            nxt = self.book.next_run()
            if nxt is not None:
                self._activate(nxt)
        self._record(now)
        return out

    def stop(self, run_id: str, reason: str) -> list[Outgoing]:
        """Stop ``run_id``: a queued run leaves the queue, the active run ends now."""
        info = self.book.info(run_id)
        if info.status in ENDED:
            raise AggregatorError(f"run {run_id} is {info.status} already")
        if run_id != self.active:
            self.book.set(run_id, "stopped", reason)
            log.info("run %s stopped before it started (%s)", run_id, reason)
            return []
        assert self.engine is not None
        self.engine.finished = True
        self.engine.phase = None  # results still on their way are refused STALE_TASK
        return self._end(run_id, "stopped", reason)

    def resume(self, run_id: str, reason: str = "resumed by the operator") -> None:
        """Queue a failed or stopped run again: made active in its turn (the queue's order is
        submission order), it resumes after its last committed round, as after a restart."""
        info = self.book.info(run_id)
        if info.status not in ("failed", "stopped"):
            raise AggregatorError(
                f"run {run_id} is {info.status}; only a failed or stopped run can be resumed"
                + (" (a finished one: submit a new run)" if info.status == "finished" else "")
            )
        self.book.set(run_id, "queued", reason)
        log.info("run %s queued again (%s; it was %s)", run_id, reason, info.status)

    def fail(self, exc: BaseException) -> None:
        """The active run cannot go on (its engine raised): record why; the next may start."""
        if self.active is not None:
            self.book.set(self.active, "failed", str(exc) or type(exc).__name__)
            log.error("run %s failed: %s", self.active, exc)
            if self.engine is not None:
                self.engine.finished = True
                try:
                    self.engine.close()
                except Exception:  # a failed run's method may fail to close too
                    log.exception("run %s: closing its engine failed", self.active)
            self.active = None

    # --- internals --------------------------------------------------------------------------

    def _activate(self, run_id: str) -> RoundEngine | None:
        try:
            config = self.book.run_config(self._config_of(run_id), run_id)
            engine = self.build(config, True)
        except StateError:
            # the run's state (its checkpoints, its stored updates, the disk) is at fault, not
            # the run: it keeps its status, and the service stops with the error (exit 2) so
            # that a restart after the operator mends the files resumes the run
            raise
        except AggregatorError as exc:
            self.book.set(run_id, "failed", str(exc))
            log.error("run %s cannot start: %s", run_id, exc)
            return None
        self.engine, self.active, self._doing = engine, run_id, ()
        if engine.finished:  # resumed after its last round: it only has to be marked
            self._end(run_id, "finished", f"{engine.round} rounds")
        else:
            self.book.set(run_id, "running", "")
            log.info(
                "run %s started (%s, round %d of %d)",
                run_id,
                config.run.method,
                engine.round + 1,
                config.run.rounds,
            )
        return engine

    def _config_of(self, run_id: str) -> AggregatorConfig:
        """The run's config as submitted, with the service's current ``[server]`` and
        ``[security]`` (an allow-list or a port changed in the config file applies on restart)."""
        stored = self.book.config_of(run_id)
        if self.service is None:
            return stored
        return stored.model_copy(
            update={"server": self.service.server, "security": self.service.security}
        )

    def _warn_changed(self, run_id: str, config: AggregatorConfig) -> None:
        """Log which ``[run]`` / ``[method]`` fields of the config file differ from those the
        run was started with (which it keeps: a run's method and rounds do not change midway)."""
        fields = set(RUN_SECTIONS)
        try:
            then = self.book.config_of(run_id).model_dump(mode="json", include=fields)
        except AggregatorError:  # reported when the run is made active
            return
        diffs = differences(then, config.model_dump(mode="json", include=fields))
        if diffs:
            shown = "; ".join(f"{k}: started with {a!r}, the file says {b!r}" for k, a, b in diffs)
            log.warning(
                "run %s resumes with the [run] and [method] it was started with, not the config "
                "file's (%s); to use the file's, stop the run (edgefed-aggregator runs stop %s) "
                "and submit the file as a new run with another run_id",
                run_id,
                shown,
                run_id,
            )

    def _lobby(self, config: AggregatorConfig) -> RoundEngine:
        engine = self.build(config, False)
        engine.run_id = str(config.run.run_id)
        engine.finished = True
        self.engine, self.active = engine, None
        return engine

    def _end(self, run_id: str, status: str, reason: str) -> list[Outgoing]:
        engine = self.engine
        assert engine is not None
        if status == "finished":
            try:
                self.export(engine)
            except Exception as exc:  # the run is finished and its checkpoints are whole:
                # a failed export (full or read-only export_dir, ...) is retried by hand
                where = engine.config.run.export_dir
                retry = (
                    f"edgefed-aggregator export --state-dir {self.book.state_dir} --run {run_id} "
                    f"--out {where}"
                )
                log.error(
                    "run %s: export to %s failed: %s; retry with: %s", run_id, where, exc, retry
                )
                reason = f"{reason}; export to {where} failed ({exc}); retry with: {retry}"
        self.book.set(run_id, status, reason)  # type: ignore[arg-type]
        log.info("run %s %s (%s); %d queued", run_id, status, reason, self._queued())
        self.active = None
        try:
            engine.close()
        except Exception:
            log.exception("run %s: closing its engine failed", run_id)
        return engine.goodbye(f"run {status}")

    def _queued(self) -> int:
        return sum(1 for i in self.book.all() if i.status == "queued")

    def _record(self, now: float) -> None:
        """Write what the active run waits for to the ledger (and the log) when it changes."""
        engine = self.engine
        if engine is None:
            return
        doing = doing_of(engine, self.active)
        if doing[:3] == self._doing[:3]:
            return
        self._doing = doing
        state, detail, agents = doing[0], doing[1], doing[2]
        snapshot = {"state": state, "detail": detail, "agents": list(agents), "since": time.time()}
        self.book.ledger.put_state(engine.run_id, SERVICE, snapshot)
        if state == "waiting":
            log.info(
                "run %s: waiting %s%s",
                engine.run_id,
                detail,
                f": {', '.join(agents)}" if agents else "",
            )


def doing_of(engine: RoundEngine, active: str | None) -> tuple[Any, ...]:
    """(state, detail, agents) of an engine: what ``status`` shows as the service state."""
    if active is None:
        return ("idle", "no run active; waiting for a submitted run", ())
    phase = engine.phase
    if phase is not None:
        missing = tuple(sorted(a for a in phase.assigned if a not in phase.done))
        return ("waiting", f"for round {phase.round} {phase.kind} results", missing)
    live = engine.registry.live(model=engine.model.sha256)
    need = engine.run.min_agents
    if len(live) < need:
        return ("waiting", f"for agents to join ({len(live)} of {need} live)", ())
    return ("running", f"after round {engine.round}", ())
