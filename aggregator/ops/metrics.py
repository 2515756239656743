"""Prometheus metrics of the aggregator service (``prometheus-client``), on their own registry.

Served over HTTP at ``http://<server.metrics_host>:<server.metrics_port>/metrics`` when
``server.metrics_port`` (or ``serve --metrics-port``) is set; off by default. Every name starts
with ``edgefed_aggregator_``:

=====================================  =====================================================
``rounds_completed_total``             rounds committed (round 0, the initial evaluation, too)
``round``                              the round in progress or last committed
``round_duration_seconds``             histogram of a round's wall time (assign to commit)
``updates_accepted_total{kind}``       results acknowledged, by task kind (train, eval)
``updates_rejected_total{code}``       results refused, by protocol error code
``bytes_received_total``               bytes of every message received (all frames)
``bytes_sent_total``                   bytes of every message sent
``agents_connected``                   agents the registry holds live
``ledger_write_seconds{op}``           histogram of ledger writes (record_update: a group's rows, commit_round)
``checkpoint_write_seconds``           histogram of checkpoint saves
=====================================  =====================================================

The service's loop thread updates them; the HTTP thread only reads the registry.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from protocol.messages import Ack, ErrorReply, TaskResult

log = logging.getLogger(__name__)

PREFIX = "edgefed_aggregator"
_FAST = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
_ROUND = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0)


class ServiceMetrics:
    """The aggregator's metrics; :meth:`serve` exposes them over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds = Counter(f"{PREFIX}_rounds_completed", "Rounds committed.", registry=r)
        self.round = Gauge(f"{PREFIX}_round", "The current round.", registry=r)
        self.round_seconds = Histogram(
            f"{PREFIX}_round_duration_seconds", "Wall time of a round.", buckets=_ROUND, registry=r
        )
        self.accepted = Counter(
            f"{PREFIX}_updates_accepted", "Results acknowledged.", ["kind"], registry=r
        )
        self.rejected = Counter(
            f"{PREFIX}_updates_rejected", "Results refused, by error code.", ["code"], registry=r
        )
        self.bytes_in = Counter(f"{PREFIX}_bytes_received", "Bytes received.", registry=r)
        self.bytes_out = Counter(f"{PREFIX}_bytes_sent", "Bytes sent.", registry=r)
        self.agents = Gauge(f"{PREFIX}_agents_connected", "Live agents.", registry=r)
        self.ledger_seconds = Histogram(
            f"{PREFIX}_ledger_write_seconds",
            "Ledger write latency.",
            ["op"],
            buckets=_FAST,
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            f"{PREFIX}_checkpoint_write_seconds",
            "Checkpoint save latency.",
            buckets=_FAST,
            registry=r,
        )
        self.port: int | None = None
        self._server: Any = None

    # --- exposure -----------------------------------------------------------------------------

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint (port 0: any free port); return the port it listens on."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        self.port = int(server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- what the service reports -------------------------------------------------------------

    def received(self, frames: Iterable[Any]) -> None:
        self.bytes_in.inc(sum(_size(f) for f in frames))

    def sent(self, frames: Sequence[Any]) -> None:
        self.bytes_out.inc(sum(_size(f) for f in frames))

    def answered(self, header: object, replies: Iterable[Any]) -> None:
        """What the engine answered to one message: counts a result accepted or refused."""
        if not isinstance(header, TaskResult):
            return
        for out in replies:
            reply = out.header
            if isinstance(reply, ErrorReply):
                self.rejected.labels(code=str(reply.code.value)).inc()
            elif isinstance(reply, Ack):
                if reply.accepted:
                    self.accepted.labels(kind=header.kind).inc()
                else:
                    self.rejected.labels(code="not_accepted").inc()

    def acked(self, acks: Iterable[Any]) -> None:
        """Acks of a group commit: each an accepted training update."""
        for out in acks:
            if isinstance(out.header, Ack) and out.header.accepted:
                self.accepted.labels(kind="train").inc()

    def refused(self, code: object) -> None:
        self.rejected.labels(code=str(getattr(code, "value", code))).inc()

    def round_done(self, summary: Any) -> None:
        self.rounds.inc()
        self.round.set(summary.round)
        self.round_seconds.observe(max(0.0, float(summary.seconds)))

    def live_agents(self, count: int) -> None:
        self.agents.set(count)

    def time_storage(self, ledger: Any = None, store: Any = None) -> None:
        """Time the ledger's writes and the checkpoint saves (wraps the instances' methods; call
        it once per instance: a serving aggregator has one ledger and a store per run)."""
        if ledger is not None:
            # record_update: one transaction per group of updates (Ledger.record_updates)
            for method, op in (
                ("record_updates", "record_update"),
                ("commit_round", "commit_round"),
            ):
                _wrap(ledger, method, self.ledger_seconds.labels(op=op).observe)
        if store is not None:
            _wrap(store, "save", self.checkpoint_seconds.observe)


def _size(frame: Any) -> int:
    if isinstance(frame, memoryview):
        return frame.nbytes
    if isinstance(frame, bytes | bytearray):
        return len(frame)
    buffer = getattr(frame, "buffer", None)
    if buffer is not None:
        return memoryview(buffer).nbytes
    return len(bytes(frame))


def _wrap(obj: Any, name: str, observe: Callable[[float], None]) -> None:
    inner = getattr(obj, name)

    @functools.wraps(inner)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            observe(time.perf_counter() - start)

    setattr(obj, name, timed)
