"""``local`` is never silent: model preparation shows its progress, and between round rows a line
every few seconds says what it waits for."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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


def test_model_preparation_shows_its_progress_or_keeps_it_for_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import sys

    from aggregator.errors import AggregatorError
    from aggregator.local import run

    script = tmp_path / "agent.py"  # stands in for `edgefed-agent`: a bar on stderr, JSON out
    script.write_text(
        "import json, sys\n"
        "print('converting: 100%|##########| 272/272', file=sys.stderr)\n"
        "if 'bad' in sys.argv:\n"
        "    print('edgefed-agent: model bad not found', file=sys.stderr); sys.exit(2)\n"
        "print(json.dumps({'name': 'm', 'path': '/m', 'sha256': '00', 'argv': sys.argv[1:]}))\n"
    )
    monkeypatch.setattr(run, "agent_command", lambda: [sys.executable, str(script)])
    info = run.prepare_model("m", progress=True)
    argv: Any = info["argv"]
    assert argv == ["model", "prepare", "--model", "m", "--progress"]
    assert "converting: 100%" in capfd.readouterr().err  # passed through as it ran
    info = run.prepare_model("m", progress=False)
    assert "--no-progress" in info["argv"]
    assert capfd.readouterr().err == ""
    with pytest.raises(AggregatorError, match="model 'bad' failed: edgefed-agent: model bad"):
        run.prepare_model("bad", progress=False)
