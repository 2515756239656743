"""Upload flow control: which large results may travel to the aggregator now.

An agent whose result is larger than the run's ``grant_above_bytes`` (told in the Welcome) does
not send it at once: it lists the task in its heartbeats' ``ready`` and sends the result when the
aggregator answers with a :class:`~protocol.messages.Grant`. :class:`UploadWindow` keeps that
bookkeeping: the results waiting for a grant (first announced, first granted) and the grants
outstanding, at most ``upload_window`` at a time. A grant lapses after ``grant_timeout_s`` or
when its agent expires; the agent announces the result again if it still holds it.

Only the task an agent was assigned in the open phase, and has not yet delivered, can wait for
a grant: an id it was not assigned (a made-up one, another agent's, an old round's) is never
queued, so one agent holds at most one place in the queue and the queue is bounded by the number
of agents, whatever a heartbeat lists. While a phase is open, up to :data:`MAX_STALE_REPLIES` of
those ids per heartbeat are answered STALE_TASK (an honest agent then forgets a result that came
too late, as it would on sending it); the rest are ignored.

The window never touches a socket or the ledger: the engine says which announced results are
already durable (those are acked, not granted) and turns the grants it returns into messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aggregator.ops.config import ServerSection

MAX_STALE_REPLIES = 4
"""Ids of one heartbeat answered STALE_TASK at most (the others are ignored)."""


@dataclass
class Announced:
    """What became of a heartbeat's ``ready`` list."""

    stored: list[str] = field(default_factory=list)
    """Already durable: ack them again, no upload needed."""
    stale: list[str] = field(default_factory=list)
    """Not the agent's open task (at most MAX_STALE_REPLIES): answer STALE_TASK."""


def grant_above(server: ServerSection) -> int | None:
    """What a Welcome tells agents: results above this many bytes wait for a grant (None: the
    window is off, send at once)."""
    return server.grant_above_bytes if server.upload_window > 0 else None


class UploadWindow:
    """Results announced as ready, and the grants outstanding for them."""

    def __init__(self, is_live: Callable[[str], bool]) -> None:
        """``is_live(agent_id)``: whether an agent may still be granted (or keep a grant)."""
        self.is_live = is_live
        self.ready: dict[str, str] = {}  # task id -> agent: large results waiting for a grant
        self.granted: dict[str, tuple[str, float]] = {}  # task id -> (agent, granted at)

    def announce(
        self,
        agent_id: str,
        task_ids: Iterable[str],
        durable: Callable[[str], bool],
        open_task: str | None,
        *,
        phase_open: bool = True,
    ) -> Announced:
        """Take a heartbeat's ``ready`` list from ``agent_id``, whose undelivered task in the
        open phase is ``open_task`` (None: it has none).

        Durable ids need no upload (the engine acks them again); the open task waits for a
        grant unless one is outstanding already (announced twice, it keeps its place); any
        other id is never queued (see the module's docstring).
        """
        out = Announced()
        for task_id in dict.fromkeys(task_ids):  # each id once, in order
            if durable(task_id):  # already durable: no need to send it again
                out.stored.append(task_id)
            elif task_id == open_task:
                if task_id not in self.granted:
                    self.ready.setdefault(task_id, agent_id)
            elif phase_open and len(out.stale) < MAX_STALE_REPLIES:
                out.stale.append(task_id)
        return out

    def arrived(self, task_id: str, agent_id: str) -> None:
        """``agent_id``'s result came in (granted or not): it no longer waits and frees its
        slot. Only the agent that announced the task can: another agent naming its task id
        (ids are derived from public values) changes nothing."""
        granted = self.granted.get(task_id)
        if granted is not None and granted[0] == agent_id:
            del self.granted[task_id]
        if self.ready.get(task_id) == agent_id:
            del self.ready[task_id]

    def grants(self, now: float, *, window: int, timeout_s: float) -> list[tuple[str, str]]:
        """Lapse stale grants, then grant waiting results up to ``window`` outstanding.

        Returns ``(agent_id, task_id)`` pairs, oldest announcement first. A waiting result
        whose agent is no longer live is dropped without a grant.
        """
        for task_id, (agent_id, at) in list(self.granted.items()):
            if now - at > timeout_s or not self.is_live(agent_id):
                del self.granted[task_id]  # it will ask again if it still holds the result
        out = []
        while self.ready and len(self.granted) < window:
            task_id = next(iter(self.ready))
            agent_id = self.ready.pop(task_id)
            if not self.is_live(agent_id):
                continue
            self.granted[task_id] = (agent_id, now)
            out.append((agent_id, task_id))
        return out
