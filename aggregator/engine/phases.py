"""The run's phase rules: who is chosen for a training round, and when an open phase may close.

:class:`PhaseRules` applies the run section's ``min_agents``, ``fraction`` and ``seed`` to pick
a round's agents (a seeded sample, so a restarted run picks the same ones), and its ``quorum``
and ``round_deadline_s`` to decide when a phase is complete:

- every assigned agent has answered (or reported that its task failed): close;
- a quorum has answered and every missing agent has gone silent (expired): close at once;
- the deadline has passed with a quorum: close, dropping the stragglers;
- the deadline has passed below quorum: extend the deadline by ``round_deadline_s``.

The rules read the registry but change nothing in the engine; an extended deadline is written
into the phase itself.
"""

from __future__ import annotations

import logging
import math
import random

from aggregator.engine.registry import Registry
from aggregator.engine.rounds import Phase
from aggregator.ops.config import RunSection

log = logging.getLogger(__name__)


class PhaseRules:
    """Selection and completion rules of one run, over its agent registry."""

    def __init__(self, run: RunSection, registry: Registry) -> None:
        self.run = run
        self.registry = registry

    def choose(self, run_id: str, round: int, live: list[str]) -> list[str]:
        """The agents of training round ``round``: ``fraction`` of ``live`` (at least
        ``min_agents``), sampled with a seed of the run, the run's seed and the round; sorted."""
        count = max(self.run.min_agents, math.ceil(self.run.fraction * len(live)))
        rng = random.Random(f"{run_id}|{self.run.seed}|{round}")
        return sorted(rng.sample(sorted(live), min(count, len(live))))

    def quorum(self, phase: Phase) -> int:
        """How many answers let ``phase`` close without the rest (at least one)."""
        return max(1, math.ceil(self.run.quorum * len(phase.assigned)))

    def complete(self, phase: Phase, now: float) -> bool:
        """Whether ``phase`` may close at ``now``; below quorum at the deadline, the deadline
        is extended (and the phase is not complete)."""
        pending = [
            a
            for a in phase.assigned
            if a not in phase.done and not self.registry.has_failed(a, phase.assigned[a])
        ]
        if not pending:
            return True
        quorum = self.quorum(phase)
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
