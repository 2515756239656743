"""The message boundary: one received message in, the replies to send out, nothing else escapes.

Whatever an agent sends — malformed frames, a header whose validation error quotes kilobytes of
its input, a payload that trips a bug in a method — is answered with an ``ErrorReply`` (and
logged), never with an exception that would stop the service. The one exception that does pass
is :class:`~aggregator.errors.StateError`: the ledger or the checkpoints failed, and the service
stops rather than run on without durability (``aggregator.cli`` maps it to an exit code).

The service calls :meth:`MessageBoundary.handle` for every authenticated message; the fuzz test
calls it the same way, so the frames that once crashed ``serve`` are checked through this path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from aggregator.engine.engine import Outgoing, RoundEngine
from aggregator.errors import StateError
from aggregator.ops.refusals import QuietLog
from protocol.errors import ErrorCode, FrameError, ProtocolError
from protocol.frames import Decoded, FrameLike, decode
from protocol.messages import ErrorReply, TaskResult

log = logging.getLogger(__name__)

INTERNAL = "internal error; see the aggregator log"


class MessageBoundary:
    """Decode a message, hand it to the engine, turn every failure into an ErrorReply."""

    def __init__(self, engine: RoundEngine, metrics: Any = None) -> None:
        self.engine = engine
        self.metrics = metrics
        """Counts answers and refused results (:class:`aggregator.ops.metrics.ServiceMetrics`)."""
        self.dropped = 0
        """Messages that did not decode (each answered with an ErrorReply)."""
        self.internal_errors = 0
        """Messages that raised something other than a protocol error (logged with traceback)."""
        self.quiet = QuietLog(log)
        """Each agent's warnings once a minute at most (an agent's flood is not the log's)."""

    def handle(
        self,
        agent_id: str,
        frames: Sequence[FrameLike],
        now: float,
        decoded: Callable[[], Decoded] | None = None,
    ) -> list[Outgoing]:
        """The replies to ``frames`` received from the authenticated ``agent_id``
        (``decoded``: the same frames decoded ahead, see :mod:`aggregator.engine.pipeline`).

        Never raises, except :class:`StateError`.
        """
        try:
            return self._handle(agent_id, frames, now, decoded)
        except StateError:
            raise  # the ledger or checkpoints failed: stop rather than run on without durability
        except Exception:  # even building an error reply failed: log it and answer plainly
            self.internal_errors += 1
            self.quiet.warn(
                f"{agent_id}\0internal",
                "agent %s: internal error at the message boundary",
                agent_id,
                now=now,
                exc_info=True,
            )
            return [Outgoing(agent_id, ErrorReply(code=ErrorCode.INTERNAL, reason=INTERNAL))]

    def _handle(
        self,
        agent_id: str,
        frames: Sequence[FrameLike],
        now: float,
        decoded: Callable[[], Decoded] | None,
    ) -> list[Outgoing]:
        try:
            msg = decoded() if decoded is not None else decode(frames)
        except FrameError as exc:
            self.dropped += 1
            self.quiet.warn(
                f"{agent_id}\0malformed",
                "agent %s: malformed message: %.300s",
                agent_id,
                exc,
                now=now,
            )
            return [Outgoing(agent_id, ErrorReply(code=exc.code, reason=str(exc)))]
        try:
            replies = self.engine.on_message(agent_id, msg, now)
            if self.metrics is not None:
                self.metrics.answered(msg.header, replies)
            return replies
        except ProtocolError as exc:
            if self.metrics is not None and isinstance(msg.header, TaskResult):
                self.metrics.refused(exc.code)
            self.quiet.warn(f"{agent_id}\0{exc.code}", "agent %s: %.300s", agent_id, exc, now=now)
            return [Outgoing(agent_id, ErrorReply(code=exc.code, reason=str(exc)))]
        except StateError:
            raise
        except Exception:  # a bug a message can reach: this message fails, the service runs on
            self.internal_errors += 1
            self.quiet.warn(
                f"{agent_id}\0internal",
                "agent %s: internal error on %s",
                agent_id,
                msg.header.type,
                now=now,
                exc_info=True,
            )
            return [Outgoing(agent_id, ErrorReply(code=ErrorCode.INTERNAL, reason=INTERNAL))]
