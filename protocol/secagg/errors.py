"""The secure-aggregation error: a round that cannot be completed or a message that breaks the
protocol. It is a :class:`~protocol.errors.ProtocolError`, so the daemons' message boundaries
already turn it into an ``ErrorReply`` and keep running."""

from __future__ import annotations

from protocol.errors import ErrorCode, ProtocolError


class SecAggError(ProtocolError):
    """Secure aggregation cannot go on (too many dropouts, a bad share, an overflow...)."""

    code = ErrorCode.TASK_FAILED
