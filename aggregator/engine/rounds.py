"""The round engine's data: what it sends, an open phase, a round's summary, task ids.

A :class:`RoundSummary` is one row of the per-round table; it is filled from each phase of
its round as that phase closes (:meth:`RoundSummary.record_train`,
:meth:`RoundSummary.record_eval`, and what the method reports, :meth:`RoundSummary.record_method`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from protocol.frames import Buffer, encode
from protocol.messages import TaskResult
from protocol.methods._common import AggregationParams, EvalParams


@dataclass(frozen=True)
class Outgoing:
    agent_id: str
    header: BaseModel
    blobs: Mapping[str, Buffer] = field(default_factory=dict)
    encoded: list[Buffer] | None = None
    """The frames, when the engine has already encoded them to count the task's bytes (the
    service sends those instead of encoding the header and hashing the blobs again)."""

    def frames(self) -> list[Buffer]:
        return self.encoded if self.encoded is not None else encode(self.header, self.blobs)


@dataclass
class RoundSummary:
    """One row of the per-round table."""

    round: int
    agents: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_em: float | None = None
    eval_rouge_l: float | None = None
    eval_side: dict[str, float] = field(default_factory=dict)
    """A method's further evaluation metrics (:data:`SIDE_EVAL_KEYS`), example-weighted like
    the eval columns: e.g. FedBiOT's ``emulator_eval_loss`` beside the full model's loss."""
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
    truncation: dict[str, float] = field(default_factory=dict)
    """What ``max_len`` cut in this round's training tasks, all agents together
    (:func:`truncation_totals`); empty when no agent reported it."""
    eval_truncation: dict[str, float] = field(default_factory=dict)
    """The same of the evaluation of this round's global (``eval_truncated_*`` in the row)."""

    def record_method(self, metrics: Mapping[str, float]) -> None:
        """Keep the finite values of what the method reports of the round."""
        self.method.update({k: float(v) for k, v in metrics.items() if math.isfinite(v)})

    def record_train(
        self, phase: Phase, now: float, details: Mapping[str, Mapping[str, str]]
    ) -> None:
        """Fill in the closed training ``phase``: agents counted, loss, bytes per agent, time,
        rejections; ``details``: what the method chose per agent, for :attr:`per_agent`."""
        results = phase.counted()
        self.agents = len(results)
        self.train_loss = weighted(results, "train_loss")
        self.bytes_up = sum(phase.bytes_up.values()) / max(len(phase.bytes_up), 1)
        self.bytes_down = sum(phase.bytes_down.values()) / max(len(phase.assigned), 1)
        self.seconds = now - phase.started
        self.rejected = phase.rejected
        self.truncation = truncation_totals(results)
        self.per_agent = {
            agent_id: {
                "up": str(phase.bytes_up.get(agent_id, 0)),
                "down": str(phase.bytes_down.get(agent_id, 0)),
                **details.get(agent_id, {}),
            }
            for agent_id in sorted(phase.assigned)
        }

    def record_eval(self, phase: Phase) -> None:
        """Fill in the closed evaluation ``phase`` of this round's global."""
        results = phase.counted()
        n = max(len(phase.assigned), 1)
        self.eval_loss = weighted(results, "eval_loss")
        self.eval_em = weighted(results, "eval_em")
        self.eval_rouge_l = weighted(results, "eval_rouge_l")
        self.eval_truncation = truncation_totals(results)
        for key in SIDE_EVAL_KEYS:
            value = weighted(results, key)
            if value is not None:
                self.eval_side[key] = value
        # what evaluating this round's global cost on the wire (it may carry state the next
        # round needs: Ferret's step, FedBiOT's emulator with the round-0 evaluation)
        self.eval_bytes_up = sum(phase.bytes_up.values()) / n
        self.eval_bytes_down = sum(phase.bytes_down.values()) / n

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
        for key in ("train_loss", "eval_loss", "eval_em", "eval_rouge_l"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        eval_truncation = {f"eval_{k}": v for k, v in self.eval_truncation.items()}
        merged = out | self.eval_side | self.truncation | eval_truncation
        return {k: v for k, v in merged.items() if math.isfinite(v)}


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
    refused: set[str] = field(default_factory=set)
    """Agents whose result was rejected: answered, but neither their update nor their metrics
    count."""
    limits: dict[str, int] = field(default_factory=dict)
    """Per agent, the most examples its task may report (an evaluation's ``max_examples``)."""

    @property
    def rejected(self) -> int:
        return len(self.refused)

    def counted(self) -> list[TaskResult]:
        """The results whose metrics count (the rejected ones left out)."""
        return [r for a, r in self.done.items() if a not in self.refused]

    def describe(self) -> dict[str, Any]:
        """What a status report shows of the open phase."""
        return {
            "kind": self.kind,
            "round": self.round,
            "assigned": len(self.assigned),
            "done": len(self.done),
        }


def task_id_for(run_id: str, round: int, kind: str, agent_id: str) -> str:
    digest = hashlib.sha256(f"{run_id}|{round}|{kind}|{agent_id}".encode()).hexdigest()[:24]
    return f"r{round}-{kind}-{digest}"


EVAL_KEYS = ("eval_loss", "eval_em", "eval_rouge_l")
SIDE_EVAL_KEYS = ("emulator_eval_loss",)
"""Evaluation metrics a method reports besides :data:`EVAL_KEYS` (what the columns score):
kept per agent and per round the same way, never in the columns."""


def eval_rows(phase: Phase) -> dict[str, dict[str, float]]:
    """Per agent of a closed evaluation phase: its eval metrics and how many examples."""
    return {
        agent_id: {k: float(v) for k, v in r.metrics.items() if k in EVAL_KEYS + SIDE_EVAL_KEYS}
        | {"examples": float(r.num_examples)}
        for agent_id, r in sorted(phase.done.items())
        if agent_id not in phase.refused and any(k in r.metrics for k in EVAL_KEYS)
    }


METRIC_MAGNITUDE = 1e15
"""No metric an agent reports may exceed this in magnitude (a memory peak in bytes is ~1e11):
sums and example-weighted means of bounded values stay finite, so a metric can never make the
round's record unstorable."""
LOSS_MAX = 1e6
"""An agent's reported loss above this is not a loss (cross-entropy of a float32 model stays
below ~100)."""
UNIT_METRICS = ("eval_em", "eval_rouge_l")
"""Metrics that are fractions, in [0, 1]."""


def metrics_problem(res: TaskResult, max_examples: int | None = None) -> str | None:
    """Why ``res``'s metrics (and, for an evaluation, its example count against its task's
    ``max_examples``) cannot be counted; None when they can. An agent's metrics go into the
    round's means and the ledger: an absurd value must be refused, not averaged."""
    if max_examples is not None and not 1 <= res.num_examples <= max_examples:
        return f"example count {res.num_examples} outside [1, {max_examples}] (the task's)"
    for key, value in res.metrics.items():
        v = float(value)
        if not math.isfinite(v) or abs(v) > METRIC_MAGNITUDE:
            return f"metric {key} = {v!r} is beyond {METRIC_MAGNITUDE:g} in magnitude"
        if key in UNIT_METRICS and not 0.0 <= v <= 1.0:
            return f"metric {key} = {v!r} is outside [0, 1]"
        if key.endswith("_loss") and not 0.0 <= v <= LOSS_MAX:
            return f"metric {key} = {v!r} is outside [0, {LOSS_MAX:g}]"
        if key in TRUNCATION_KEYS and v < 0:
            return f"metric {key} = {v!r} is negative"
    cut = res.metrics.get("truncated_examples")
    if cut is not None and float(cut) > max(res.num_examples, 1):
        return f"metric truncated_examples = {cut!r} exceeds the {res.num_examples} examples"
    return None


TRUNCATION_KEYS = ("truncated_examples", "truncated_tokens_mean", "truncated_tokens_max")
"""What an agent reports of ``max_len`` cuts per task (:mod:`edge_agent.training.truncation`)."""


def truncation_totals(results: list[TaskResult]) -> dict[str, float]:
    """What ``max_len`` cut over ``results``: examples cut summed (not averaged: every cut
    example is one the operator loses), the mean cut weighted by those examples, the longest
    cut. Empty when none reports any."""
    parts = [r.metrics for r in results if "truncated_examples" in r.metrics]
    if not parts:
        return {}
    cut = sum(float(m["truncated_examples"]) for m in parts)
    tokens = sum(
        float(m["truncated_examples"]) * float(m.get("truncated_tokens_mean", 0.0)) for m in parts
    )
    return {
        "truncated_examples": cut,
        "truncated_tokens_mean": round(tokens / cut, 2) if cut else 0.0,
        "truncated_tokens_max": max(float(m.get("truncated_tokens_max", 0.0)) for m in parts),
    }


def eval_limit(params: Mapping[str, Any]) -> int:
    """The ``max_examples`` of an evaluation task's params (every method's ``eval`` section)."""
    section = params.get("eval")
    value = section.get("max_examples") if isinstance(section, Mapping) else None
    return int(value) if isinstance(value, int) else EvalParams().max_examples


WEIGHT_MAX = AggregationParams().max_weight
"""The most examples one result counts for in a reported metric's mean (as in the updates')."""


def weighted(results: list[TaskResult], key: str) -> float | None:
    """The example-weighted mean of ``key`` (each weight capped at :data:`WEIGHT_MAX`); None
    when no result reports it or the mean is not finite."""
    pairs = [
        (float(r.metrics[key]), min(max(r.num_examples, 1), WEIGHT_MAX))
        for r in results
        if key in r.metrics
    ]
    if not pairs:
        return None
    total = sum(w for _, w in pairs)
    mean = sum(v * w for v, w in pairs) / total
    return mean if math.isfinite(mean) else None
