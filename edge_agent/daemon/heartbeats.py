"""A session's timing: heartbeats out, the aggregator's liveness in, and the link probes.

Paranoid Pirate liveness: any message from the aggregator proves it alive (:meth:`Heartbeats.
heard`); after ``liveness`` heartbeat intervals of silence it counts as lost. Until ``Welcome``
the interval and liveness are the daemon's own settings; ``Welcome`` replaces them with the
aggregator's and schedules the first heartbeat one interval later.

After ``Welcome`` the daemon starts a probe pair (:meth:`Heartbeats.start_probes`, see
:class:`~edge_agent.daemon.link.LinkMeter`): the echo of an empty probe gives the RTT, the echo of a
1 MiB one the upload rate. The next heartbeat reports both once, the rate capped at a
simulated link rate if one is set. A probe not echoed within the liveness window, and at least
:data:`PROBE_TIMEOUT_S`, is abandoned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from edge_agent.daemon.link import LinkMeter, agent_log
from protocol.frames import Buffer
from protocol.messages import Heartbeat, TaskAssign

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 60.0
"""A link probe not echoed within this (1 MiB on a slow uplink takes a while) is abandoned."""


class Heartbeats:
    """When the next heartbeat is due, whether the aggregator is lost, and what a beat says."""

    def __init__(
        self,
        *,
        agent_id: str,
        interval: float,
        liveness: int,
        bandwidth_limit_mbps: float | None,
        clock: Callable[[], float],
    ) -> None:
        self._configured = (interval, liveness)
        self.interval = interval
        self.liveness = liveness
        self.bandwidth_limit_mbps = bandwidth_limit_mbps
        self.clock = clock
        self.meter = LinkMeter()
        self.log = agent_log(logger, agent_id)
        self.last_recv = 0.0
        self.next_beat = 0.0

    # --------------------------------------------------------------------------- liveness

    def start_session(self, now: float) -> None:
        """A new connection: the configured interval and liveness, the clock starts at ``now``."""
        self.interval, self.liveness = self._configured
        self.last_recv = now

    def welcome(self, interval: float, liveness: int, now: float) -> None:
        """The aggregator's ``Welcome`` sets the pace; the first heartbeat is one interval away."""
        self.interval, self.liveness = interval, liveness
        self.next_beat = now + self.interval

    def heard(self, now: float) -> None:
        """A message (even a malformed one) arrived from the aggregator."""
        self.last_recv = now

    @property
    def window(self) -> float:
        """Seconds of silence after which the aggregator counts as lost."""
        return self.interval * self.liveness

    def silence(self, now: float) -> float:
        return now - self.last_recv

    def lost(self, now: float) -> bool:
        return now - self.last_recv > self.window

    def until_lost(self, now: float) -> float:
        return self.last_recv + self.window - now

    # --------------------------------------------------------------------------- heartbeats

    def due(self, now: float) -> bool:
        return now >= self.next_beat

    def until_due(self, now: float) -> float:
        return self.next_beat - now

    def beat_now(self) -> None:
        """Bring the next heartbeat forward to now (a result waits for a grant)."""
        self.next_beat = self.clock()

    def beat(
        self, now: float, current: tuple[TaskAssign, float] | None, ready: list[str]
    ) -> Heartbeat:
        """The heartbeat to send now (idle, or busy with ``current``'s task and progress)."""
        rtt_ms, mbps = self.meter.report()
        limit = self.bandwidth_limit_mbps
        if limit is not None and mbps is not None:
            mbps = min(mbps, limit)
        if rtt_ms is not None:
            self.log.info(
                "link: rtt %.2f ms, upload %s Mbit/s",
                rtt_ms,
                "?" if mbps is None else f"{mbps:.1f}",
            )
        if current is None:
            beat = Heartbeat(state="idle", rtt_ms=rtt_ms, bandwidth_mbps=mbps, ready=ready)
        else:
            assign, progress = current
            beat = Heartbeat(
                run_id=assign.run_id,
                round=assign.round,
                state="busy",
                task_id=assign.task_id,
                progress=progress,
                rtt_ms=rtt_ms,
                bandwidth_mbps=mbps,
                ready=ready,
            )
        self.next_beat = now + self.interval
        return beat

    # --------------------------------------------------------------------------- link probes

    def start_probes(self, now: float) -> list[Buffer]:
        """The first probe (RTT) to send after ``Welcome``."""
        return self.meter.start(now)

    def on_echo(self, echo: str, now: float) -> list[Buffer] | None:
        """An aggregator heartbeat echoed a probe; may return the next probe to send."""
        return self.meter.on_echo(echo, now)

    def expire_probes(self, now: float) -> None:
        self.meter.expire(now, max(self.window, PROBE_TIMEOUT_S))
