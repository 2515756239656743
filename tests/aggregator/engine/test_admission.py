"""Methods that cannot run on an agent's hardware are not assigned there, and say why."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from engine_harness import PROFILE, Harness, assigns

from aggregator.engine.admission import Waiting
from aggregator.methods import MethodContext
from aggregator.methods.ferret.server import FerretServer
from protocol.messages import GpuInfo


def test_ferret_admits_by_memory(tiny_model_dir: Path) -> None:
    server = FerretServer({}, MethodContext(model_dir=tiny_model_dir))
    weights = sum(t.numel() * t.element_size() for t in server.weights.values())
    roomy = PROFILE.model_copy(update={"ram_available": int(7 * weights)})
    cramped = PROFILE.model_copy(update={"ram_available": int(2 * weights)})
    assert server.admit("a1", roomy) is None
    reason = server.admit("a2", cramped)
    assert reason is not None and "needs about" in reason and "free RAM" in reason
    gpu = PROFILE.model_copy(update={"ram_available": 0, "gpus": [
        GpuInfo(index=0, name="H100", memory_total=80 << 30, memory_free=int(7 * weights))]})  # fmt: skip
    assert server.admit("a3", gpu) is None


def test_engine_skips_agents_the_method_refuses(tmp_path: Path) -> None:
    h = Harness(tmp_path, min_agents=1)
    try:
        h.method.admit = lambda agent, profile: "too small" if agent == "a2" else None  # type: ignore[attr-defined]
        for agent in ("a1", "a2"):
            h.hello(agent)
        tasks = assigns(h.tick())
        assert set(tasks) == {"a1"}
    finally:
        h.close()


def test_a_run_the_method_cannot_start_says_why_and_starts_once_it_can(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path, min_agents=2)
    try:
        h.method.admit = lambda agent, profile: "needs 1098 MiB" if agent == "a2" else None  # type: ignore[attr-defined]
        h.hello("a1")
        assert assigns(h.tick()) == {} and h.engine.blocked is None  # an ordinary wait
        h.hello("a2")
        with caplog.at_level(logging.WARNING, logger="aggregator.engine.engine"):
            assert assigns(h.tick()) == {}
            assert assigns(h.tick()) == {}
        blocked = h.engine.status()["blocked"]
        assert blocked is not None and "a2: needs 1098 MiB" in blocked
        assert "needs 2 agents" in blocked and "can use 1 of the 2 live" in blocked
        said = [r for r in caplog.records if "cannot start" in r.getMessage()]
        assert len(said) == 1  # once, then again only every BLOCKED_LOG_EVERY_S
        h.method.admit = lambda agent, profile: None  # type: ignore[attr-defined]
        assert set(assigns(h.tick())) == {"a1", "a2"}
        assert h.engine.blocked is None
    finally:
        h.close()


def test_a_passing_wait_is_not_a_block(tmp_path: Path) -> None:
    h = Harness(tmp_path, min_agents=2)
    try:
        h.method.admit = lambda agent, profile: Waiting("switching") if agent == "a2" else None  # type: ignore[attr-defined]
        for agent in ("a1", "a2"):
            h.hello(agent)
        assert assigns(h.tick()) == {} and h.engine.blocked is None
    finally:
        h.close()


def test_an_agent_the_method_accepts_again_is_no_longer_named_as_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path, min_agents=3)
    try:
        refuse = {"a2", "a3"}
        h.method.admit = lambda agent, profile: "too small" if agent in refuse else None  # type: ignore[attr-defined]
        for agent in ("a1", "a2", "a3"):
            h.hello(agent)
        assert assigns(h.tick()) == {}
        assert "a2: too small" in (h.engine.blocked or "")
        refuse.discard("a2")  # a2 fits now; a3 still does not
        assert assigns(h.tick()) == {}
        blocked = h.engine.blocked or ""
        assert "a3: too small" in blocked and "a2" not in blocked
    finally:
        h.close()


def test_a_hello_flood_writes_the_ledger_once_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every Hello once wrote the agent's profile with a synced SQLite transaction on the
    loop: ~1,000 Hellos/s from one agent slowed every other agent's answers to seconds."""
    from engine_harness import PROFILE, SHA

    from protocol.messages import Hello, Welcome

    h = Harness(tmp_path)
    writes: list[str] = []
    real = h.ledger.upsert_agent
    monkeypatch.setattr(
        h.ledger, "upsert_agent", lambda a, p, now: (writes.append(a), real(a, p, now))
    )
    for _ in range(500):
        out = h.hello("a1")
        assert isinstance(out[0].header, Welcome)
    assert writes == ["a1"]
    bigger = PROFILE.model_copy(update={"cpus": 64})
    h.send("a1", Hello(agent_id="a1", versions=[1], profile=bigger, models=[SHA]))
    assert writes == ["a1", "a1"]  # a changed profile is written at once
    h.clock.now += 61.0
    h.send("a1", Hello(agent_id="a1", versions=[1], profile=bigger, models=[SHA]))
    assert writes == ["a1", "a1", "a1"]  # and an unchanged one once a minute
    assert h.ledger.agents()[0].profile["cpus"] == 64
    h.close()
