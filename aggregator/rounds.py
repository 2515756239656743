"""The round engine's plain data: what it sends, a round's summary, an open phase, task ids."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel

from protocol.messages import TaskResult


@dataclass(frozen=True)
class Outgoing:
    agent_id: str
    header: BaseModel
    blobs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass
class RoundSummary:
    """One row of the per-round table."""

    round: int
    agents: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_em: float | None = None
    bytes_up: float = 0.0
    bytes_down: float = 0.0
    eval_bytes_up: float = 0.0
    eval_bytes_down: float = 0.0
    """Per agent, what the evaluation phase of this round's global moved (0: none ran)."""
    seconds: float = 0.0
    rejected: int = 0
    method: dict[str, float] = field(default_factory=dict)
    """What the method reports of the round (e.g. SLoRA's stage and density)."""
    per_agent: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per agent of the round: bytes up and down, and what the method chose for it."""

    def as_metrics(self) -> dict[str, float]:
        out = {
            "agents": float(self.agents),
            "bytes_up_per_agent": self.bytes_up,
            "bytes_down_per_agent": self.bytes_down,
            "seconds": self.seconds,
            "rejected": float(self.rejected),
        }
        if self.eval_bytes_up or self.eval_bytes_down:
            out["eval_bytes_up_per_agent"] = self.eval_bytes_up
            out["eval_bytes_down_per_agent"] = self.eval_bytes_down
        for key in ("train_loss", "eval_loss", "eval_em"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


Kind = Literal["train", "eval", "score"]


@dataclass
class Phase:
    kind: Kind
    round: int
    assigned: dict[str, str]  # agent id -> task id
    deadline: float
    started: float
    done: dict[str, TaskResult] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    rejected: int = 0


def task_id_for(run_id: str, round: int, kind: str, agent_id: str) -> str:
    digest = hashlib.sha256(f"{run_id}|{round}|{kind}|{agent_id}".encode()).hexdigest()[:24]
    return f"r{round}-{kind}-{digest}"


def weighted(results: list[TaskResult], key: str) -> float | None:
    pairs = [(r.metrics[key], max(r.num_examples, 1)) for r in results if key in r.metrics]
    if not pairs:
        return None
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total
