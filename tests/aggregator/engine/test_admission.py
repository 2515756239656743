"""Methods that cannot run on an agent's hardware are not assigned there, and say why."""

from __future__ import annotations

from pathlib import Path

from engine_harness import PROFILE, Harness, assigns

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
