"""What ``edgefed-aggregator local`` (``make demo``) shows between round rows, so it is never silent.

The round table prints a row when a round ends; a round (or the start, while agents load the
model) can take minutes. :class:`Ticker` prints one line every ``every`` seconds meanwhile: what
the open phase waits for (``round 2 train: 1/3 results, 45 s``) or that the agents are still
starting. The engine is read on the service's own loop thread (``call_soon``), never from here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO


class Ticker:
    """Call :meth:`poll` often (the local run's wait loop does, twice a second)."""

    def __init__(
        self,
        service: Any,
        out: TextIO,
        *,
        every: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.out = out
        self.every = every
        self.clock = clock
        self.started = self.last = clock()
        self.latest: dict[str, Any] | None = None
        self._since: dict[tuple[Any, ...], float] = {}

    def _snapshot(self) -> None:
        status = self.service.engine.status()  # on the service's loop thread
        phase = status.get("phase")
        if phase:
            self._since.setdefault((phase["kind"], phase["round"]), self.clock())
        self.latest = status

    def poll(self) -> str | None:
        """Ask for a fresh snapshot; every ``every`` seconds print (and return) a line."""
        self.service.call_soon(self._snapshot)
        now = self.clock()
        if now - self.last < self.every:
            return None
        self.last = now
        line = self.line(now)
        print(line, file=self.out, flush=True)
        return line

    def line(self, now: float) -> str:
        status = self.latest or {}
        phase = status.get("phase")
        if status.get("blocked"):
            return f"  ... cannot start: {status['blocked']}"
        if not phase:
            joined = len(status.get("agents") or [])
            return (
                f"  ... waiting for agents ({joined} joined; each loads the model first), "
                f"{now - self.started:.0f} s"
            )
        since = self._since.get((phase["kind"], phase["round"]), now)
        return (
            f"  ... round {phase['round']} {phase['kind']}: {phase['done']}/{phase['assigned']} "
            f"results, {now - since:.0f} s"
        )
