"""Results on their way to the aggregator: the link thread's side of the durable outbox.

A finished result is stored in the outbox by the worker and handed to the link thread as an
:class:`~edge_agent.daemon.worker.Outgoing`; :class:`Uploads` sends it at most once per session and
forgets it only when the aggregator's ``Ack`` (or a STALE_TASK/REJECTED_UPDATE ``ErrorReply``)
says so. After every ``Welcome`` the whole outbox is resent in order.

Grants: a ``Welcome`` with ``grant_above`` makes a stored result larger than that many bytes
wait. Its task id goes into the next heartbeat's ``ready`` list (the heartbeat is brought
forward to now) and the result is sent when the aggregator's ``Grant`` for it arrives. Error
replies are never held back.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Sequence
from typing import Any

from edge_agent.daemon.link import Link, agent_log
from edge_agent.daemon.outbox import Outbox
from edge_agent.daemon.worker import Outgoing, task_tag
from protocol.frames import frames_nbytes
from protocol.messages import Ack, ErrorReply, Grant, TaskAssign

logger = logging.getLogger(__name__)

MAX_READY = 64
"""Most task ids one heartbeat announces as waiting for a grant."""


class Uploads:
    """Sends stored results and error replies over ``link``; tracks what waits for a grant.

    ``announce`` is called when a result starts waiting for a grant: the daemon then sends a
    heartbeat (with :meth:`ready`) at once.
    """

    def __init__(
        self,
        *,
        agent_id: str,
        link: Link,
        outbox: Outbox,
        outgoing: queue.Queue[Outgoing],
        announce: Callable[[], None],
    ) -> None:
        self.link = link
        self.outbox = outbox
        self.outgoing = outgoing
        self.announce = announce
        self.log = agent_log(logger, agent_id)
        self._sent_this_session: set[str] = set()
        self._grant_above: int | None = None
        self._awaiting: dict[str, None] = {}  # large results waiting for a Grant, in order

    def start_session(self, grant_above: int | None) -> None:
        """After ``Welcome``: resend the outbox in order (large results wait for a grant)."""
        self._sent_this_session.clear()
        self._grant_above = grant_above
        self._awaiting.clear()
        pending = self.outbox.pending()
        for task_id, frames in pending:
            if self._needs_grant(frames):
                self._await_grant(task_id)
            elif self.link.send(frames):
                self._sent_this_session.add(task_id)
        if pending:
            unsent = len(pending) - len(self._sent_this_session) - len(self._awaiting)
            self.log.info(
                "resent %d results from the outbox (%d wait for a grant)",
                len(self._sent_this_session),
                len(self._awaiting),
            )
            if unsent:
                self.log.warning(
                    "%d results wait for the next connection (send queue full)", unsent
                )

    def ready(self) -> list[str]:
        """Task ids of results waiting for a grant (for the next heartbeat), oldest first."""
        for task_id in [t for t in self._awaiting if not self.outbox.has(t)]:
            del self._awaiting[task_id]
        return list(self._awaiting)[:MAX_READY]

    def flush(self) -> None:
        """Send what the worker finished since the last call (the session is welcomed)."""
        while True:
            try:
                item = self.outgoing.get_nowait()
            except queue.Empty:
                return
            if item.stored and (
                item.task_id in self._sent_this_session or not self.outbox.has(item.task_id)
            ):
                continue  # already resent from the outbox after Welcome, or already acked
            if item.stored and self._needs_grant(item.frames):
                self._await_grant(item.task_id)
                continue
            if not self.link.send(item.frames):
                what = "result stays in the outbox" if item.stored else "error reply dropped"
                self.log.warning("task %s: send queue full; %s", item.task_id, what)
                continue
            if item.stored:
                self._sent_this_session.add(item.task_id)
            self.log.debug("task %s: %s sent", item.task_id, "result" if item.stored else "error")

    def resend_stored(self, h: TaskAssign) -> bool:
        """Resend the stored result of an assigned task already done; False if there is none."""
        stored = self.outbox.get(h.task_id)
        if stored is None:
            return False
        self.log.info("%s: already done; resending the stored result", task_tag(h))
        if self.link.send(stored):
            self._sent_this_session.add(h.task_id)
        return True

    def on_grant(self, h: Grant) -> None:
        frames = self.outbox.get(h.task_id)
        self._awaiting.pop(h.task_id, None)
        if frames is None:
            return  # acked meanwhile
        if self.link.send(frames):
            self._sent_this_session.add(h.task_id)
            self.log.debug("task %s: granted result sent", h.task_id)
        else:
            self._await_grant(h.task_id)

    def on_ack(self, h: Ack) -> None:
        self._awaiting.pop(h.task_id, None)
        if self.outbox.remove(h.task_id):
            how = "acknowledged" if h.accepted else "recorded but not accepted"
            self.log.info("task %s round %d: result %s", h.task_id, h.round, how)

    def drop(self, h: ErrorReply) -> None:
        """The aggregator will never take this task's result: it leaves the outbox."""
        dropped = self.outbox.remove(h.task_id)
        self.log.warning(
            "task %s round %d: %s: %s%s",
            h.task_id,
            h.round,
            h.code.value,
            h.reason,
            "; result removed from the outbox" if dropped else "",
        )

    def _needs_grant(self, frames: Sequence[Any]) -> bool:
        return self._grant_above is not None and frames_nbytes(frames) > self._grant_above

    def _await_grant(self, task_id: str) -> None:
        """Announce a large result in the next heartbeat (now) and send it when granted."""
        if task_id not in self._awaiting:
            self._awaiting[task_id] = None
            self.announce()
            self.log.info("task %s: result ready; waiting for the aggregator's grant", task_id)
