"""A regional tier: an aggregator toward its agents, an agent toward an upstream aggregator.

``edgefed-aggregator region --config region.toml`` runs two things in one process:

- an :class:`~aggregator.service.AggregatorService` whose engine is *driven*: it opens a round
  only when the upstream assigns one, and sends its agents exactly what the upstream sent (the
  :class:`RelayMethod` forwards params, blobs and precision verbatim);
- an agent daemon (:mod:`edge_agent.daemon`, with its reconnects, heartbeats and durable
  outbox) toward ``[upstream]``, whose one "client method" (:class:`RelayClient`) hands each
  upstream task to the regional engine, waits for the region's round to close, and answers
  with the region's update: the example-weighted mean of its agents' updates, in the same
  payload kind, with ``num_examples`` = the region's total.

For a method whose aggregation is an example-weighted mean of what agents send (fedit, SLoRA's
two stages, Ferret's coefficients), the upstream's weighted mean of regional means
weighted by regional totals is the flat weighted mean of every agent:
``Σ_R W_R · (Σ_{a∈R} w_a x_a / W_R) / Σ_R W_R = Σ_a w_a x_a / Σ_a w_a``. Ferret's triples
are merged by (group, seed): an agent that did not pick a pair adds 0, as on the upstream.
FedPipe is refused: its agents send factors of different ranks and it averages in ΔW = B·A
space, which a mean of factors is not. FedBiOT is refused too: its aggregation is a plain
FedAvg of LoRA factors, but what it sends is per agent (the emulator only to agents that do not
hold it, alignment deltas from each agent's version), which a relay forwarding one upstream
task to all its agents cannot serve. Robust rules (median, trimmed mean) and clipping on the
upstream then act on regions, not agents: see docs/operations.md.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aggregator.config import AggregatorConfig
from aggregator.errors import ConfigError, UpdateRejected
from aggregator.methods import Assignment, Update
from edge_agent.errors import EdgeAgentError
from edge_agent.methods import TaskInput, TaskOutput, Workspace
from edge_agent.workspace import AgentWorkspace, WorkspaceSettings
from protocol import payloads
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import BaseModelRef, Profile, TaskResult

log = logging.getLogger(__name__)

NOT_TIERABLE = {
    "fedpipe": "FedPipe averages in ΔW = B·A space over agents of different ranks",
    "fedbiot": "FedBiOT sends each agent the emulator by hash and alignment deltas from the "
    "version that agent holds; a region would have to hold and serve them per agent",
}
UPDATE_BLOB = "update"


@dataclass
class RegionRound:
    """What the region has made of one upstream round."""

    kind: payloads.PayloadKind
    method: str
    meta: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    pairs: dict[tuple[int, int], float] = field(default_factory=dict)
    """Ferret: (group, seed) -> weighted sum of coefficients."""
    weight: int = 0


class RelayMethod:
    """The server half a regional engine runs: forward the upstream task, average what returns."""

    def __init__(self, name: str) -> None:
        if name in NOT_TIERABLE:
            raise ConfigError(f"{name} cannot run in a regional tier: {NOT_TIERABLE[name]}")
        self.name = name
        self.task: dict[tuple[str, int], Assignment] = {}
        self.open: RegionRound | None = None
        self.partial: tuple[int, bytes, int] | None = None
        """(round, payload, examples) of the last committed round: the region's update."""

    # --- toward the agents -------------------------------------------------------------------

    def set_task(self, kind: str, round: int, assignment: Assignment) -> None:
        self.task = {k: v for k, v in self.task.items() if k[1] >= round - 1}
        self.task[(kind, round)] = assignment

    def assign(self, round: int, agent_id: str, kind: str) -> Assignment:
        try:
            return self.task[(kind, round)]
        except KeyError:
            raise UpdateRejected(
                ErrorCode.STALE_TASK, f"no upstream {kind} task for round {round}"
            ) from None

    def validate(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> Update:
        if set(blobs) != {UPDATE_BLOB}:
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, f"expected one blob {UPDATE_BLOB!r}")
        if result.num_examples < 1:
            raise UpdateRejected(ErrorCode.PAYLOAD_MISMATCH, "an update needs num_examples >= 1")
        try:
            p = payloads.decode(blobs[UPDATE_BLOB], payloads.Expect(method=self.name, round=round))
        except ProtocolError as exc:
            raise UpdateRejected(exc.code, str(exc)) from None
        shapes = {k: tuple(v.shape) for k, v in p.tensors.items()}
        meta = payloads.caller_meta(p.meta)
        if self.open is None:
            dtypes = {k: v.dtype for k, v in p.tensors.items()}
            self.open = RegionRound(p.kind, p.method, meta, shapes, dtypes)
        elif (
            p.kind != self.open.kind
            or meta != self.open.meta
            or (p.kind is not payloads.PayloadKind.SEEDCOEF and shapes != self.open.shapes)
        ):
            raise UpdateRejected(
                ErrorCode.PAYLOAD_MISMATCH,
                "kind, parameters or tensor shapes differ from the region's other updates",
            )
        return Update(
            agent_id=result.agent_id,
            task_id=result.task_id,
            num_examples=result.num_examples,
            tensors=p.tensors,
            metrics=dict(result.metrics),
        )

    # --- aggregation ---------------------------------------------------------------------------

    def begin_round(self, round: int) -> None:
        self.open = None

    def add(self, update: Update) -> None:
        acc = self.open
        assert acc is not None, "validate() opens the round's accumulator"
        w = update.num_examples
        if acc.kind is payloads.PayloadKind.SEEDCOEF:
            t = update.tensors
            for g, s, v in zip(t["group"].tolist(), t["seed"].tolist(), t["value"].double().tolist(),
                               strict=True):  # fmt: skip
                acc.pairs[(g, s)] = acc.pairs.get((g, s), 0.0) + w * v
        else:
            for name, value in update.tensors.items():
                term = value.detach().to(torch.float64) * w
                acc.sums[name] = acc.sums[name] + term if name in acc.sums else term
        acc.weight += w

    def finish_round(self, round: int) -> dict[str, float]:
        acc = self.open
        if acc is None or acc.weight == 0:
            self.partial = None
            return {"examples": 0.0}
        if acc.kind is payloads.PayloadKind.SEEDCOEF:
            keys = sorted(acc.pairs)
            tensors = {
                "group": torch.tensor([k[0] for k in keys], dtype=torch.int32),
                "seed": torch.tensor([k[1] for k in keys], dtype=torch.int32),
                "value": torch.tensor([acc.pairs[k] / acc.weight for k in keys]).float(),
            }
        else:
            tensors = {n: (s / acc.weight).to(acc.dtypes[n]) for n, s in sorted(acc.sums.items())}
        data = payloads.encode(acc.kind, tensors, method=acc.method, round=round, meta=acc.meta)
        self.partial = (round, data, acc.weight)
        return {"examples": float(acc.weight)}

    # --- state: the region's last update, so a restart can answer a re-sent task ----------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        if self.partial is None:
            return {}, {"relay": self.name}
        round, data, examples = self.partial
        blob = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return {"partial": blob}, {
            "relay": self.name,
            "partial_round": str(round),
            "partial_examples": str(examples),
        }

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        if "partial" in tensors:
            data = bytes(tensors["partial"].numpy().tobytes())
            self.partial = (int(meta["partial_round"]), data, int(meta["partial_examples"]))

    def export(self, out_dir: Path, *, base_model_name: str) -> dict[str, Path]:
        raise UpdateRejected(
            ErrorCode.UNSUPPORTED_METHOD, "a regional tier has no global state to export"
        )


def weighted_metrics(results: list[TaskResult]) -> tuple[int, dict[str, float]]:
    """The region's num_examples and example-weighted metrics of its agents' results."""
    total = sum(r.num_examples for r in results)
    keys = sorted({k for r in results for k in r.metrics})
    out = {}
    for key in keys:
        pairs = [(r.metrics[key], max(r.num_examples, 1)) for r in results if key in r.metrics]
        out[key] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
    return total, out


class Outcome:
    """One upstream task's wait for the regional phase that answers it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.results: list[TaskResult] = []


# --- the runner ------------------------------------------------------------------------------


class Region:
    """The regional aggregator service and the bridge its upstream client method uses."""

    def __init__(self, config: AggregatorConfig, model: BaseModelRef) -> None:
        from aggregator.service import AggregatorService

        self.relay = RelayMethod(config.run.method)
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
        if a.kind == "score":
            raise RegionError(f"{a.method}: a regional tier does not relay score tasks")
        done = self.relay.partial
        if a.kind == "train" and done is not None and done[0] == a.round:
            return TaskOutput(num_examples=done[2], blobs={UPDATE_BLOB: done[1]})
        outcome = Outcome()
        with self._lock:
            self._waiting[(a.kind, a.round)] = outcome
        assignment = Assignment(
            params=dict(a.params), blobs={k: bytes(v) for k, v in task.blobs.items()}, quant=a.quant
        )

        def start() -> None:
            self.relay.set_task(a.kind, a.round, assignment)
            self.service.engine.drive(a.kind, a.round)

        self.service.call_soon(start)
        log.info("region: upstream %s task of round %d relayed to the region", a.kind, a.round)
        while not outcome.done.wait(0.2):
            if ws.should_stop() or self.error is not None:
                raise RegionError("the region stopped before its round closed")
        total, metrics = weighted_metrics(outcome.results)
        if a.kind != "train":
            return TaskOutput(num_examples=total, metrics=metrics)
        done = self.relay.partial
        if done is None or done[0] != a.round:
            raise RegionError(f"round {a.round}: no update was accepted in this region")
        return TaskOutput(num_examples=done[2], metrics=metrics, blobs={UPDATE_BLOB: done[1]})


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
                model=model.name, data=Path(os.devnull), objects_dir=state_dir / "upstream-objects"
            )
        )
        self._model = _ModelRef(model.name, Path(os.devnull), model.sha256)

    def _resolve(self) -> _ModelRef:
        return self._model


def run_region(config: AggregatorConfig, model: BaseModelRef) -> int:
    """Serve the region until the upstream run ends (its Bye) or SIGTERM; return an exit code."""
    from edge_agent.daemon import Daemon, DaemonSettings
    from edge_agent.link import CurveKeys, LinkSettings
    from edge_agent.outbox import Outbox
    from edge_agent.profile import collect_profile

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
