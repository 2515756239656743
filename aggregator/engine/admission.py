"""Admission: which agents may join a run, and which of them the run's method can use.

:class:`Admission` answers an agent's Hello: the connection must be the agent it claims to be,
the two sides must share a protocol version, the agent must hold the run's base model (when
it lists what it holds), and one that says it is a regional tier must be listed as one
(``security.regions``). An admitted agent is entered in the registry and the ledger, and the
method is told through its optional ``on_hello`` hook. Before a phase is assigned, the method's
optional ``admit`` hook may refuse an agent whose hardware cannot run it; each refusal is logged
once per agent, with its reason. :meth:`Admission.view` is what a method may know of an agent.

The method is passed to each call rather than kept, since an engine's method may be swapped
(tests do), and hooks are looked up on every call.
"""

from __future__ import annotations

import logging
import time

from aggregator.engine.registry import Registry
from aggregator.methods import AgentView, ServerMethod
from aggregator.store.ledger import Ledger
from protocol import PROTOCOL_VERSIONS
from protocol.errors import ErrorCode, VersionMismatch
from protocol.messages import BaseModelRef, ErrorReply, Hello, negotiate


class Waiting(str):
    """A reason from ``admit`` that is a normal, passing wait (SLoRA computing its switch to
    LoRA), logged at INFO; any other reason is logged as a WARNING (the operator may act)."""


log = logging.getLogger(__name__)

RECORD_EVERY_S = 60.0
"""An agent's unchanged profile is written to the ledger (and its join logged) at most this
often, however often it says Hello."""


class Admission:
    """Checks Hellos and filters agents by what the method can run on."""

    def __init__(
        self,
        registry: Registry,
        ledger: Ledger,
        model: BaseModelRef,
        method_name: str,
        regions: frozenset[str] = frozenset(),
    ) -> None:
        self.registry = registry
        self.regions = regions
        """Ids allowed to join as a regional tier (``security.regions``)."""
        self.ledger = ledger
        self.model = model
        self.method_name = method_name
        self._recorded: dict[str, tuple[dict[str, object], float]] = {}
        """Per agent, the profile last written to the ledger and when (monotonic)."""
        self.refused: dict[str, str] = {}
        """Agent → the method's current reason for not assigning it (gone once it is assigned)."""
        self._logged: set[str] = set()  # agents whose refusal was logged (once per agent)

    def hello(
        self, method: ServerMethod, agent_id: str, hello: Hello, now: float
    ) -> ErrorReply | int:
        """Admit the agent on connection ``agent_id``: the negotiated protocol version, or
        the ErrorReply that refuses it (then nothing is recorded)."""
        if hello.agent_id != agent_id:
            return ErrorReply(
                code=ErrorCode.IDENTITY_MISMATCH,
                reason=f"connection is {agent_id!r} but Hello claims {hello.agent_id!r}",
                ref=hello.msg_id,
            )
        if hello.role == "region" and agent_id not in self.regions:
            reason = (
                f"{agent_id} is not allowed to join as a regional tier (its update would stand "
                "for many agents): list it in [security] regions of this aggregator"
            )
            log.warning("agent %s refused: %s", agent_id, reason)
            return ErrorReply(code=ErrorCode.UNKNOWN_AGENT, reason=reason, ref=hello.msg_id)
        try:
            version = negotiate(hello.versions, PROTOCOL_VERSIONS)
        except VersionMismatch as exc:
            return ErrorReply(code=exc.code, reason=str(exc), ref=hello.msg_id)
        if hello.models and self.model.sha256 not in hello.models:
            reason = (
                f"this run trains {self.model.name} (sha256 {self.model.sha256}); the agent holds "
                f"{', '.join(hello.models)}: give the agent that model (agent.model) or run "
                "it against another aggregator"
            )
            log.warning("agent %s refused: %s", agent_id, reason)
            return ErrorReply(code=ErrorCode.MODEL_MISMATCH, reason=reason, ref=hello.msg_id)
        self.registry.hello(agent_id, hello, now)
        profile = hello.profile.model_dump(mode="json")
        recorded = self._recorded.get(agent_id)
        if recorded is None or recorded[0] != profile or now - recorded[1] >= RECORD_EVERY_S:
            # a synced ledger write per Hello let one agent's Hello flood slow every other
            # agent's answers (~1,000 writes/s on the loop): the same profile is written again
            # at most once a minute, and logged with it
            self.ledger.upsert_agent(agent_id, profile, time.time())
            self._recorded[agent_id] = (profile, now)
            log.info(
                "agent %s joined (%d cpus, %.1f GFLOP/s fp32)",
                agent_id,
                hello.profile.cpus,
                hello.profile.matmul_gflops_fp32,
            )
        on_hello = getattr(method, "on_hello", None)
        if on_hello is not None:
            on_hello(self.view(agent_id))
        return version

    def assignable(self, method: ServerMethod, agents: list[str]) -> list[str]:
        """Agents the method can run on; a refusal is logged once per agent with its reason."""
        admit = getattr(method, "admit", None)
        if admit is None:
            return agents
        out = []
        for agent_id in agents:
            reason = admit(agent_id, self.registry.agents[agent_id].profile)
            if reason is None:
                self.refused.pop(agent_id, None)
                out.append(agent_id)
                continue
            if agent_id not in self._logged:
                self._logged.add(agent_id)
                level = logging.INFO if isinstance(reason, Waiting) else logging.WARNING
                log.log(level, "agent %s not assigned %s: %s", agent_id, self.method_name, reason)
            self.refused[agent_id] = reason
        return out

    def refusals(self, agents: list[str]) -> dict[str, str]:
        """Of ``agents``, those the method refused at the last :meth:`assignable` for a reason
        that is not a passing wait, with that reason."""
        return {a: r for a, r in self.refused.items() if a in agents and not isinstance(r, Waiting)}

    def view(self, agent_id: str) -> AgentView:
        """What a method may know of a registered agent."""
        a = self.registry.agents[agent_id]
        return AgentView(
            agent_id=agent_id,
            profile=a.profile,
            holds=frozenset(a.holds),
            rtt_ms=a.rtt_ms,
            bandwidth_mbps=a.bandwidth_mbps,
            role=a.role,
        )
