"""``edgefed-aggregator runs show`` in words: what the live run waits for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from aggregator.runs import cli as runs_cli

REPLY: dict[str, Any] = {
    "ok": True,
    "run": {
        "run_id": "r1",
        "method": "fedpipe",
        "status": "running",
        "reason": "",
        "changed_at": 0.0,
    },  # fmt: skip
    "service": None,
    "rounds": [],
}


def shown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, live: dict[str, Any] | None) -> str:
    monkeypatch.setattr(runs_cli, "_call", lambda _state, _req: {**REPLY, "live": live})
    result = CliRunner().invoke(runs_cli.runs, ["show", "--state-dir", str(tmp_path), "r1"])
    assert result.exit_code == 0, result.output
    return result.output


def test_show_says_why_a_run_cannot_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    why = "round 1 needs 3 agents (run.min_agents) and fedpipe can use 2 of the 3 live ones"
    assert f"cannot start: {why}" in shown(monkeypatch, tmp_path, {"blocked": why})
    assert "cannot start" not in shown(monkeypatch, tmp_path, {"blocked": None})
    assert "cannot start" not in shown(monkeypatch, tmp_path, None)
