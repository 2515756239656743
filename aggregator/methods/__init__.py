"""Server halves of the methods, and the interface they implement.

A server method never touches sockets: it says what each agent is sent, validates what comes
back, folds accepted updates into a running aggregate as they arrive (so the aggregator never
holds every update at once), and owns the global state that is checkpointed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from protocol.frames import Buffer
from protocol.messages import Profile, TaskResult

if TYPE_CHECKING:
    from aggregator.ops.config import AggregatorConfig


@dataclass
class Update:
    """An agent's update after validation: what the aggregate is made of."""

    agent_id: str
    task_id: str
    num_examples: int
    tensors: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Assignment:
    """What one agent is sent for one task: method parameters and blobs.

    ``quant`` overrides the run's base precision for this agent (FedPipe picks it per agent).
    """

    params: dict[str, Any]
    blobs: Mapping[str, Buffer] = field(default_factory=dict)
    quant: str | None = None


@dataclass(frozen=True)
class AgentView:
    """What a method may know of an agent: its measured profile, the large objects (by sha256)
    it says it holds, the link figures of its latest heartbeat, and whether it is a regional
    tier (``role == "region"``) rather than an agent that trains."""

    agent_id: str
    profile: Profile
    holds: frozenset[str] = frozenset()
    rtt_ms: float | None = None
    bandwidth_mbps: float | None = None
    role: str = "agent"


class ServerMethod(Protocol):
    name: str

    def assign(self, round: int, agent_id: str, kind: str) -> Assignment:
        """Parameters and blobs of a ``kind`` task ("train" or "eval") for ``agent_id``."""
        ...

    def validate(self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]) -> Update:
        """Decode and check an update; raise :class:`aggregator.errors.UpdateRejected`."""
        ...

    def begin_round(self, round: int) -> None: ...

    def add(self, update: Update) -> None:
        """Fold one accepted update into the running aggregate of the open round."""
        ...

    def finish_round(self, round: int) -> dict[str, float]:
        """Turn the running aggregate into the new global state; return round metrics."""
        ...

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Global state to checkpoint: tensors and string metadata."""
        ...

    def restore(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None: ...

    def export(self, out_dir: Path, *, base_model_name: str) -> dict[str, Path]:
        """Write the result (e.g. a PEFT adapter directory); return what was written."""
        ...


class OptionalHooks(Protocol):
    """Hooks a server method may define (the engine checks with ``getattr``).

    ``admit(agent_id, profile)``
        None when the method can run on the agent, else the reason it cannot (logged once).
    ``on_hello(view)``
        Every Hello (also a reconnect): e.g. what the agent holds now.
    ``plan(round, kind, views)``
        Called as a phase opens, before any ``assign`` of it, with the views of its agents.
    ``wants_score(round) -> bool``
        True to run a "score" phase before training round ``round`` (e.g. FedPipe's importance
        pass); it is asked again after the phase closes, so return False once scores are in.
    ``add_score(round, result, blobs)``
        One agent's score result; raise :class:`aggregator.errors.UpdateRejected` to refuse it.
        The method keeps what it needs to survive a restart (e.g. under ``context.state_dir``).
    ``finish_score(round) -> dict[str, float]``
        The score phase closed; the returned metrics join the round's table row.
    ``reveal_agents(round) -> list[str] | None``
        Asked as a training phase closes: agents to run one more ``score`` phase with before
        ``finish_round`` (secure aggregation's unmask stage); None: finish at once. Asked
        again after that phase, so return None then.
    ``task_label(kind, label) -> str``
        The label a phase's task ids are made from (default ``label``, e.g. "train"). Secure
        aggregation makes it unique per round attempt: after a restart the round's keys are
        gone, so a result sent before it must not pass for one of the new attempt.
    ``should_stop(round) -> bool``
        Asked after each round commits: True ends the run before training round ``round``
        (differential privacy's target ε).
    ``agent_details(round) -> dict[str, dict[str, str]]``
        Per agent, what the method chose for it this round (rank, precision…), for the table.
    """

    def admit(self, agent_id: str, profile: Profile) -> str | None: ...

    def on_hello(self, view: AgentView) -> None: ...

    def plan(self, round: int, kind: str, views: Mapping[str, AgentView]) -> None: ...

    def wants_score(self, round: int) -> bool: ...

    def add_score(
        self, round: int, result: TaskResult, blobs: Mapping[str, memoryview]
    ) -> None: ...

    def finish_score(self, round: int) -> dict[str, float]: ...

    def agent_details(self, round: int) -> dict[str, dict[str, str]]: ...


@dataclass(frozen=True)
class MethodContext:
    """What a server method may know of the run besides its parameters."""

    model_name: str = ""
    model_dir: Path | None = None
    """A local copy of the base model (HF directory), when the operator gave one."""
    state_dir: Path | None = None
    seed: int = 0
    rounds: int = 0
    """The run's round count (0: not known)."""
    public_data: Path | None = None
    """A public JSONL the aggregator itself may train on (run.public_data)."""
    max_message_bytes: int | None = None
    """The largest message the service accepts (server.max_message_bytes), when known."""
    regions: frozenset[str] = frozenset()
    """Ids of regional tiers (security.regions): an update of theirs stands for many agents,
    so the per-update weight cap (aggregation.max_weight) does not apply to it."""


def context_of(config: AggregatorConfig) -> MethodContext:
    """What a run's server method (or a region's relay) may know of the run."""
    return MethodContext(
        model_name=config.run.model,
        model_dir=config.run.model_dir,
        state_dir=config.server.state_dir,
        seed=config.run.seed,
        rounds=config.run.rounds,
        public_data=config.run.public_data,
        max_message_bytes=config.server.max_message_bytes,
        regions=frozenset(config.security.regions),
    )


MethodFactory = Callable[[Mapping[str, Any], MethodContext], ServerMethod]


def decode_update(
    blobs: Mapping[str, memoryview], name: str, expect: Any, *, copy: bool = True
) -> Any:
    """The one payload blob ``name`` of a TaskResult, decoded against ``expect``
    (a ``protocol.payloads.Expect``); anything else is an :class:`UpdateRejected`.

    ``copy=False``: the tensors are views of the received blob (see ``payloads.decode``), for
    a method that never writes to an update's tensors: the intake's update log writes the
    payload from the same memory after ``validate``, and its sha256 must still hold."""
    from aggregator.errors import UpdateRejected
    from protocol import payloads
    from protocol.errors import ErrorCode, ProtocolError

    if set(blobs) != {name}:
        raise UpdateRejected(
            ErrorCode.PAYLOAD_MISMATCH, f"expected one blob {name!r}, got {sorted(blobs)}"
        )
    try:
        return payloads.decode(blobs[name], expect, copy=copy)
    except ProtocolError as exc:
        raise UpdateRejected(exc.code, str(exc)) from None


def server_methods() -> dict[str, MethodFactory]:
    """Method name → factory taking the run's method parameters."""
    from protocol.methods import NAMES

    return {n: importlib.import_module(f"aggregator.methods.{n}").Server for n in NAMES}
