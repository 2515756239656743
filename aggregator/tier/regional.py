"""A regional tier: an aggregator toward its agents, an agent toward an upstream aggregator.

``edgefed-aggregator region --config region.toml`` runs two things in one process:

- an :class:`~aggregator.engine.service.AggregatorService` whose engine is *driven*: it opens a phase
  only when the upstream assigns one, and its server method is a *relay*
  (:mod:`aggregator.tier.relay`) that sends its agents what the upstream's task asks of them;
- an agent daemon (:mod:`edge_agent.daemon.daemon`, with its reconnects, heartbeats and durable
  outbox) toward ``[upstream]``, whose Hello says ``role = "region"`` and whose one "client
  method" (:class:`RelayClient`) hands each upstream task to the regional engine, waits for the
  region's phase to close, and answers with the relay's answer: the region's aggregate (or
  FedPipe's mean importance scores) with ``num_examples`` = the region's total.

Which methods give the flat result through a tier, and why, is in :mod:`aggregator.tier.relay` and
the two method relays; robust rules (median, trimmed mean) and clipping on the upstream then act
on regions, not agents: see docs/operations.md.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from aggregator.errors import ConfigError
from aggregator.methods import Assignment, MethodContext, context_of
from aggregator.ops.config import AggregatorConfig
from aggregator.tier.relay import UPSTREAM_OBJECTS, Relay, RelayMethod, weighted_metrics
from edge_agent.daemon.workspace import AgentWorkspace, WorkspaceSettings
from edge_agent.errors import EdgeAgentError
from edge_agent.methods import TaskInput, TaskOutput, Workspace
from protocol.errors import ErrorCode
from protocol.messages import BaseModelRef, Profile, TaskResult
from protocol.methods._common import AggregationParams

log = logging.getLogger(__name__)


def relay_for(name: str, params: Mapping[str, Any], context: MethodContext) -> Relay:
    """The relay a regional tier runs for method ``name`` (``params``: the region's [method])."""
    from protocol.methods import NAMES

    if name not in NAMES:
        raise ConfigError(f"unknown method {name!r}; known: {sorted(NAMES)}")
    if name == "fedpipe":
        from aggregator.methods.fedpipe.relay import FedpipeRelay

        return FedpipeRelay(params, context)
    if name == "fedbiot":
        from aggregator.methods.fedbiot.relay import FedbiotRelay

        return FedbiotRelay(params, context)
    try:
        rule = AggregationParams.model_validate(params.get("aggregation", {}))
    except ValidationError as exc:
        raise ConfigError(f"[method.aggregation]: {exc}") from None
    return RelayMethod(name, rule)


class Outcome:
    """One upstream task's wait for the regional phase that answers it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.results: list[TaskResult] = []
        self.error: Exception | None = None


# --- the runner ------------------------------------------------------------------------------


class Region:
    """The regional aggregator service and the bridge its upstream client method uses."""

    def __init__(self, config: AggregatorConfig, model: BaseModelRef) -> None:
        from aggregator.engine.service import AggregatorService

        self.relay = relay_for(config.run.method, config.method, context_of(config))
        self.service = AggregatorService(
            config, model, method=self.relay, driven=True, on_phase=self._phase_closed
        )
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, int], Outcome] = {}
        self.error: BaseException | None = None

    def serve(self) -> None:
        try:
            self.service.run()
        except BaseException as exc:  # reported by the thread that waits on it
            self.error = exc
            self.service.bound.set()

    def _phase_closed(self, kind: str, round: int, results: list[TaskResult]) -> None:
        with self._lock:
            outcome = self._waiting.pop((kind, round), None)
        if outcome is not None:
            outcome.results = results
            outcome.done.set()

    def answer(self, task: TaskInput, ws: Workspace) -> TaskOutput:
        """Run the upstream's task as a regional phase; the region's update or metrics."""
        a = task.assign
        if a.kind == "score" and not hasattr(self.relay, "add_score"):
            raise RegionError(f"{a.method}: this method's relay has no score phase")
        done = self.relay.answers.get(a.kind, a.round)
        if done is not None:  # a re-sent task (the region's answer was lost or not yet acked)
            return TaskOutput(num_examples=done[1], blobs=done[0])
        outcome = Outcome()
        with self._lock:
            self._waiting[(a.kind, a.round)] = outcome
        assignment = Assignment(
            params=dict(a.params), blobs={k: bytes(v) for k, v in task.blobs.items()}, quant=a.quant
        )

        def start() -> None:
            try:
                self.relay.set_task(a.kind, a.round, assignment)
            except Exception as exc:  # answered to the upstream as a failed task
                outcome.error = exc
                outcome.done.set()
                return
            self.service.engine.drive(a.kind, a.round)

        self.service.call_soon(start)
        log.info("region: upstream %s task of round %d relayed to the region", a.kind, a.round)
        while not outcome.done.wait(0.2):
            if ws.should_stop() or self.error is not None:
                raise RegionError("the region stopped before its round closed")
        if outcome.error is not None:
            raise RegionError(f"the upstream's {a.kind} task: {outcome.error}")
        total, metrics = weighted_metrics(outcome.results)
        if a.kind == "eval":
            return TaskOutput(num_examples=total, metrics=metrics)
        done = self.relay.answers.get(a.kind, a.round)
        if done is None:
            raise RegionError(f"round {a.round}: no {a.kind} result was accepted in this region")
        return TaskOutput(num_examples=done[1], metrics=metrics, blobs=done[0])


class RegionError(EdgeAgentError):
    code = ErrorCode.TASK_FAILED


class RelayClient:
    """The upstream daemon's client method: every task is answered by the region."""

    def __init__(self, region: Region, name: str) -> None:
        self.region = region
        self.name = name

    def run(self, task: TaskInput, ws: Workspace) -> TaskOutput:
        return self.region.answer(task, ws)


@dataclass(frozen=True)
class _ModelRef:
    name: str
    path: Path
    sha256: str


class _RegionWorkspace(AgentWorkspace):
    """The upstream daemon's workspace: the run's model hash, no weights, no data."""

    def __init__(self, model: BaseModelRef, state_dir: Path) -> None:
        super().__init__(
            WorkspaceSettings(
                model=model.name, data=Path(os.devnull), objects_dir=state_dir / UPSTREAM_OBJECTS
            )
        )
        self._model = _ModelRef(model.name, Path(os.devnull), model.sha256)

    def _resolve(self) -> _ModelRef:
        return self._model


def run_region(config: AggregatorConfig, model: BaseModelRef) -> int:
    """Serve the region until the upstream run ends (its Bye) or SIGTERM; return an exit code."""
    from edge_agent.daemon.daemon import Daemon, DaemonSettings
    from edge_agent.daemon.link import CurveKeys, LinkSettings
    from edge_agent.daemon.outbox import Outbox
    from edge_agent.daemon.profile import collect_profile

    up = config.upstream
    if up is None:
        raise ConfigError("a regional tier needs an [upstream] section")
    # the region never ends a run of its own: the upstream's rounds drive it
    config = config.model_copy(update={"run": config.run.model_copy(update={"rounds": 100_000})})
    state = config.server.state_dir
    curve = None
    if not up.insecure:
        assert up.secret_key is not None and up.server_public_key is not None
        curve = CurveKeys.load(up.secret_key, up.server_public_key)
    settings = DaemonSettings(
        LinkSettings(up.id, up.endpoint, curve),
        up.heartbeat_interval,
        up.liveness,
        stop_on_bye=True,
        role="region",
    )
    region = Region(config, model)
    profile = Profile.model_validate(collect_profile(measure=True, disk_path=state))
    name = config.run.method
    outbox = Outbox(state / "upstream-outbox")
    daemon = Daemon(
        settings,
        workspace=_RegionWorkspace(model, state),
        outbox=outbox,
        profile=profile,
        methods={name: lambda: RelayClient(region, name)},
    )
    thread = threading.Thread(target=region.serve, name="region-service", daemon=True)
    thread.start()
    region.service.bound.wait()
    if region.error is not None:
        raise region.error
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.request_stop())
    try:
        return daemon.run()
    finally:
        region.service.should_exit.set()
        thread.join(10)
