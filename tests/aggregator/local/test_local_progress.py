"""``local`` is never silent between round rows: a line every few seconds says what it waits for."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from aggregator.local.progress import Ticker


class Engine:
    def __init__(self) -> None:
        self.state: dict[str, Any] = {"phase": None, "agents": []}

    def status(self) -> dict[str, Any]:
        return dict(self.state)


class Service:
    def __init__(self) -> None:
        self.engine = Engine()
        self.queued: list[Callable[[], None]] = []

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.queued.append(fn)

    def run_loop(self) -> None:  # what the service's loop thread does
        while self.queued:
            self.queued.pop(0)()


def test_ticker_reports_agents_starting_then_the_open_phase() -> None:
    now = [0.0]
    service, out = Service(), io.StringIO()
    ticker = Ticker(service, out, every=15.0, clock=lambda: now[0])
    assert ticker.poll() is None  # not yet 15 s
    service.engine.state["agents"] = [{"agent_id": "agent-1"}]
    service.run_loop()
    now[0] = 16.0
    assert ticker.poll() == "  ... waiting for agents (1 joined; each loads the model first), 16 s"
    service.engine.state["phase"] = {"kind": "train", "round": 2, "assigned": 3, "done": 1}
    service.run_loop()  # the engine is read on the loop thread only
    now[0] = 20.0
    assert ticker.poll() is None
    service.run_loop()
    now[0] = 46.0
    assert ticker.poll() == "  ... round 2 train: 1/3 results, 30 s"
    assert out.getvalue().count("\n") == 2
