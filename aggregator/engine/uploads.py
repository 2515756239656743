"""Upload flow control: which large results may travel to the aggregator now.

An agent whose result is larger than the run's ``grant_above_bytes`` (told in the Welcome) does
not send it at once: it lists the task in its heartbeats' ``ready`` and sends the result when the
aggregator answers with a :class:`~protocol.messages.Grant`. :class:`UploadWindow` keeps that
bookkeeping: the results waiting for a grant (first announced, first granted) and the grants
outstanding, at most ``upload_window`` at a time. A grant lapses after ``grant_timeout_s`` or
when its agent expires; the agent announces the result again if it still holds it.

The window never touches a socket or the ledger: the engine says which announced results are
already durable (those are acked, not granted) and turns the grants it returns into messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aggregator.ops.config import ServerSection


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
        self, agent_id: str, task_ids: Iterable[str], durable: Callable[[str], bool]
    ) -> list[str]:
        """Take a heartbeat's ``ready`` list; return the task ids that are already durable.

        Those need no upload (the engine acks them again); the rest wait for a grant unless
        one is outstanding already. A task keeps its place in the queue if announced twice.
        """
        stored = []
        for task_id in task_ids:
            if durable(task_id):  # already durable: no need to send it again
                stored.append(task_id)
            elif task_id not in self.granted:
                self.ready.setdefault(task_id, agent_id)
        return stored

    def arrived(self, task_id: str) -> None:
        """A result came in (granted or not): it no longer waits and frees its slot."""
        self.granted.pop(task_id, None)
        self.ready.pop(task_id, None)

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
