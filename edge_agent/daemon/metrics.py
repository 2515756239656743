"""Prometheus metrics of one agent daemon (``prometheus-client``), on their own registry.

Served over HTTP at ``http://<agent.metrics_host>:<agent.metrics_port>/metrics`` when
``agent.metrics_port`` (or ``edgefed-agent run --metrics-port``) is set; off by default. Every
name starts with ``edgefed_agent_``:

=====================================  =====================================================
``connected``                          1 while welcomed by an aggregator, else 0
``sessions_total``                     Welcomes received (a reconnect adds one)
``tasks_completed_total{kind}``        tasks whose result was stored for sending
``tasks_failed_total{kind,code}``      tasks that ended in an error reply, by error code
``task_duration_seconds{kind}``        histogram of a task's wall time (start to stored result)
``result_bytes_total``                 bytes of the results produced (all frames)
``examples_total{kind}``               examples the tasks trained or evaluated on
``train_loss``                         the last training task's ``train_loss``
``truncated_examples_total{kind}``     examples that ``max_len`` cut
``outbox_results``                     results waiting in the outbox for an acknowledgement
``round``                              the round of the last task started
=====================================  =====================================================

The link and worker threads update them; the HTTP thread only reads the registry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from edge_agent.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "edgefed_agent"
_TASK = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0)


class AgentMetrics:
    """One agent's metrics; :meth:`serve` exposes them over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connected = Gauge(f"{PREFIX}_connected", "1 while welcomed.", registry=r)
        self.sessions = Counter(f"{PREFIX}_sessions", "Welcomes received.", registry=r)
        self.completed = Counter(
            f"{PREFIX}_tasks_completed", "Tasks with a stored result.", ["kind"], registry=r
        )
        self.failed = Counter(
            f"{PREFIX}_tasks_failed", "Tasks that failed.", ["kind", "code"], registry=r
        )
        self.task_seconds = Histogram(
            f"{PREFIX}_task_duration_seconds",
            "Wall time of a task.",
            ["kind"],
            buckets=_TASK,
            registry=r,
        )
        self.result_bytes = Counter(f"{PREFIX}_result_bytes", "Bytes of results.", registry=r)
        self.examples = Counter(
            f"{PREFIX}_examples", "Examples trained or evaluated on.", ["kind"], registry=r
        )
        self.train_loss = Gauge(f"{PREFIX}_train_loss", "Last training loss.", registry=r)
        self.truncated = Counter(
            f"{PREFIX}_truncated_examples", "Examples cut by max_len.", ["kind"], registry=r
        )
        self.outbox = Gauge(f"{PREFIX}_outbox_results", "Results awaiting an ack.", registry=r)
        self.round = Gauge(f"{PREFIX}_round", "Round of the last task started.", registry=r)
        self.port: int | None = None
        self._server: Any = None

    # --- exposure -----------------------------------------------------------------------------

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint (port 0: any free port); return the port it listens on.
        A port that cannot be bound is a :class:`ConfigError` (the operator's to fix)."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"agent.metrics_port: cannot listen on {host}:{port} ({exc.strerror or exc})"
            ) from None
        self._server = server
        self.port = int(server.server_port)
        return self.port

    @property
    def url(self) -> str | None:
        return None if self.port is None else f"http://{self._host()}:{self.port}/metrics"

    def _host(self) -> str:
        host = str(self._server.server_address[0]) if self._server is not None else "127.0.0.1"
        return f"[{host}]" if ":" in host else host

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- what the daemon reports ------------------------------------------------------------

    def welcomed(self) -> None:
        self.sessions.inc()
        self.connected.set(1)

    def disconnected(self) -> None:
        self.connected.set(0)

    def started(self, round_: int) -> None:
        self.round.set(round_)

    def done(
        self, kind: str, seconds: float, examples: int, nbytes: int, metrics: Mapping[str, float]
    ) -> None:
        self.completed.labels(kind=kind).inc()
        self.task_seconds.labels(kind=kind).observe(max(0.0, seconds))
        self.examples.labels(kind=kind).inc(max(0, examples))
        self.result_bytes.inc(nbytes)
        if "train_loss" in metrics:
            self.train_loss.set(metrics["train_loss"])
        self.truncated.labels(kind=kind).inc(max(0.0, metrics.get("truncated_examples", 0.0)))

    def failed_task(self, kind: str, code: str) -> None:
        self.failed.labels(kind=kind, code=code).inc()

    def waiting(self, results: int) -> None:
        self.outbox.set(results)
