"""Registry of agents: who said Hello, what they measured, when they were last heard from.

An agent is live while it has been heard from within ``liveness`` heartbeat intervals
(Paranoid Pirate); after that it expires and is not selected until it says Hello again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.messages import Heartbeat, Hello, Profile


@dataclass
class AgentState:
    agent_id: str
    profile: Profile
    models: tuple[str, ...]
    methods: tuple[str, ...]
    holds: set[str]
    role: str
    first_seen: float
    last_seen: float
    live: bool = True
    task_id: str = ""
    state: str = "idle"
    progress: float = 0.0
    rtt_ms: float | None = None
    bandwidth_mbps: float | None = None
    failed: set[str] = field(default_factory=set)


class Registry:
    def __init__(self, *, interval: float, liveness: int) -> None:
        self.window = interval * liveness
        self.agents: dict[str, AgentState] = {}

    def hello(self, agent_id: str, hello: Hello, now: float) -> None:
        old = self.agents.get(agent_id)
        self.agents[agent_id] = AgentState(
            agent_id=agent_id,
            profile=hello.profile,
            models=tuple(hello.models),
            methods=tuple(hello.methods),
            holds=set(hello.holds),
            role=hello.role,
            first_seen=old.first_seen if old else now,
            last_seen=now,
            rtt_ms=hello.profile.rtt_ms,
            bandwidth_mbps=hello.profile.bandwidth_mbps,
        )

    def is_live(self, agent_id: str) -> bool:
        agent = self.agents.get(agent_id)
        return agent is not None and agent.live

    def known(self, agent_id: str) -> bool:
        return agent_id in self.agents

    def seen(self, agent_id: str, now: float) -> None:
        """Any message proves the agent alive again, even after it expired."""
        agent = self.agents[agent_id]
        agent.last_seen = now
        agent.live = True

    def beat(self, agent_id: str, beat: Heartbeat) -> None:
        agent = self.agents[agent_id]
        agent.state = beat.state
        agent.progress = beat.progress
        if beat.rtt_ms is not None:
            agent.rtt_ms = beat.rtt_ms
        if beat.bandwidth_mbps is not None:
            agent.bandwidth_mbps = beat.bandwidth_mbps

    def assigned(self, agent_id: str, task_id: str) -> None:
        self.agents[agent_id].task_id = task_id

    def failed(self, agent_id: str, task_id: str) -> None:
        self.agents[agent_id].failed.add(task_id)

    def has_failed(self, agent_id: str, task_id: str) -> bool:
        agent = self.agents.get(agent_id)
        return agent is not None and task_id in agent.failed

    def gone(self, agent_id: str) -> None:
        if agent_id in self.agents:
            self.agents[agent_id].live = False

    def expire(self, now: float) -> list[str]:
        expired = [
            a.agent_id for a in self.agents.values() if a.live and now - a.last_seen > self.window
        ]
        for agent_id in expired:
            self.agents[agent_id].live = False
        return expired

    def live(self, *, model: str | None = None) -> list[str]:
        return sorted(
            a.agent_id
            for a in self.agents.values()
            if a.live and (model is None or model in a.models)
        )

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "agent_id": a.agent_id,
                "live": a.live,
                "state": a.state,
                "task_id": a.task_id,
                "progress": a.progress,
                "last_seen": a.last_seen,
                "cpus": a.profile.cpus,
                "ram_total": a.profile.ram_total,
                "gpus": [g.name for g in a.profile.gpus],
                "gflops_fp32": a.profile.matmul_gflops_fp32,
                "rtt_ms": a.rtt_ms,
                "bandwidth_mbps": a.bandwidth_mbps,
            }
            for a in sorted(self.agents.values(), key=lambda a: a.agent_id)
        ]
