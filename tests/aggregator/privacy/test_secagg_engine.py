"""Secure aggregation through the real round engine, in-process: the server wrapper's stages
run as the engine's phases, the agent wrapper answers them, and dropouts are real
(agents that fail their task after sharing or before revealing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_harness import MODEL, PROFILE, SHA, Clock, lora_state

from aggregator.engine.engine import RoundEngine, RoundSummary
from aggregator.methods import MethodContext
from aggregator.methods.fedit.server import FeditServer
from aggregator.ops.config import build_config
from aggregator.privacy.wrap import private_method
from aggregator.store.checkpoint import CheckpointStore
from aggregator.store.ledger import Ledger
from edge_agent.methods import TaskInput, TaskOutput, Workspace
from edge_agent.privacy.secagg_method import SecureClient
from protocol import payloads
from protocol.errors import ErrorCode
from protocol.frames import decode, encode
from protocol.messages import ErrorReply, Hello, TaskAssign, TaskResult
from protocol.secagg.fixedpoint import sum_error_bound

AGENTS = "abcdefgh"


class FakeFedit:
    """A client method that 'trains' to a fixed adapter per agent."""

    name = "fedit"

    def __init__(self, state: dict[str, torch.Tensor], n: int) -> None:
        self.state, self.n = state, n

    def run(self, task: TaskInput, ws: Workspace) -> TaskOutput:
        blob = payloads.encode_lora(self.state, method="fedit", round=task.assign.round)
        return TaskOutput(num_examples=self.n, metrics={"train_loss": 1.0}, blobs={"update": blob})


def _engine(
    tmp_path: Path, clock: Clock | None = None, model_dir: Path | None = None
) -> tuple[RoundEngine, Clock, list[RoundSummary]]:
    raw: dict[str, Any] = {
        "server": {"state_dir": str(tmp_path), "heartbeat_interval": 1.0, "liveness": 3},
        "security": {"insecure": True},
        "run": {"run_id": "s", "rounds": 2, "min_agents": 8, "eval": False, "model_sha256": SHA},
        "method": {"lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj"]}},
        "privacy": {"secure_aggregation": True, "secagg": {"degree": 6, "clip_range": 16.0}},
    }
    config = build_config(raw)
    summaries: list[RoundSummary] = []
    clock = clock or Clock()
    engine = RoundEngine(
        config,
        private_method(FeditServer(config.method, MethodContext(model_dir=model_dir)), config),
        MODEL,
        ledger=Ledger(tmp_path / "ledger.sqlite"),
        store=CheckpointStore(tmp_path / "checkpoints"),
        clock=clock,
        on_round=summaries.append,
    )
    engine.start()
    return engine, clock, summaries


def _drive(
    engine: RoundEngine,
    clock: Clock,
    agents: dict[str, SecureClient],
    fail: dict[str, str],
    stop_after: str = "",
) -> list[str]:
    """Run until the engine finishes round 1; ``fail[agent] = stage`` makes that agent fail
    its task at that stage (``mask`` or ``unmask``) and every later one. Returns the stages."""
    for a in agents:
        engine.on_message(
            a,
            decode(encode(Hello(agent_id=a, versions=[1], profile=PROFILE, models=[SHA]))),
            clock.now,
        )
    seen: list[str] = []
    dead: set[str] = set()
    for _ in range(200):
        clock.now += 0.1
        out = engine.tick(clock.now)
        for o in out:
            if not isinstance(o.header, TaskAssign) or o.header.round != 1:
                continue
            a, assign = o.agent_id, o.header
            stage = assign.params["secagg"]["stage"]
            seen.append(stage) if stage not in seen else None
            if fail.get(a) == stage or a in dead:
                dead.add(a)
                reply = ErrorReply(
                    code=ErrorCode.TASK_FAILED, reason="gone", task_id=assign.task_id
                )
                engine.on_message(a, decode(encode(reply)), clock.now)
                continue
            msg = decode(o.frames())
            output = agents[a].run(TaskInput(assign, None, msg.blobs), None)  # type: ignore[arg-type]
            result = TaskResult(
                run_id=assign.run_id, round=1, task_id=assign.task_id, agent_id=a,
                method="fedit", kind=assign.kind, num_examples=output.num_examples,
                metrics=output.metrics,
            )  # fmt: skip
            engine.on_message(a, decode(encode(result, output.blobs)), clock.now)
        if engine.round >= 1 or (stop_after and stop_after in seen):
            return seen
    raise AssertionError(f"round 1 never committed; stages {seen}")


@pytest.mark.parametrize(
    ("fail", "counted"),
    [({}, list(AGENTS)), ({"b": "mask", "d": "unmask"}, [a for a in AGENTS if a != "b"])],
    ids=["all", "drop-after-sharing-and-after-masking"],
)
def test_engine_round_gives_the_survivors_mean(
    tmp_path: Path, fail: dict[str, str], counted: list[str]
) -> None:
    engine, clock, summaries = _engine(tmp_path)
    states = {a: lora_state(float(i)) for i, a in enumerate(AGENTS)}
    examples = {a: 3 + 2 * i for i, a in enumerate(AGENTS)}
    agents = {a: SecureClient(FakeFedit(states[a], examples[a])) for a in AGENTS}
    stages = _drive(engine, clock, agents, fail)
    assert stages == ["advertise", "share", "mask", "unmask"]
    total = sum(examples[a] for a in counted)
    expected = {
        k: sum(examples[a] * states[a][k].double() for a in counted) / total for k in states["a"]
    }
    state, _ = engine.method.state()
    for name, value in expected.items():
        diff = (state[name].double() - value).abs().max().item()
        assert diff <= sum_error_bound(len(AGENTS), 24) + 1e-6  # fixed point, then float32 storage
    assert summaries[-1].method["secagg_survivors"] == len(counted)
    # nothing individual stored: the rows have no payload
    rows = engine.ledger.updates("s", 1)
    assert sorted(r.agent_id for r in rows) == counted
    assert all(r.blob_path is None for r in rows)


def test_too_many_dropouts_fail_the_round_cleanly(tmp_path: Path) -> None:
    engine, clock, summaries = _engine(tmp_path)
    agents = {a: SecureClient(FakeFedit(lora_state(1.0), 4)) for a in AGENTS}
    # degree 6, threshold 4 of 6: with five of eight silent at unmask no secret can be rebuilt
    _drive(engine, clock, agents, dict.fromkeys("bcdef", "unmask"))
    assert summaries[-1].method["secagg_failed"] == 1.0
    state, _ = engine.method.state()
    assert state == {}  # the global stays as it was (none yet), nothing half-unmasked
    assert engine.round == 1 and not engine.finished  # and the run goes on


def test_a_restart_mid_round_starts_the_round_again_with_fresh_keys(tmp_path: Path) -> None:
    states = {a: lora_state(float(i)) for i, a in enumerate(AGENTS)}
    agents = {a: SecureClient(FakeFedit(states[a], 2)) for a in AGENTS}
    first, clock, _ = _engine(tmp_path)
    _drive(first, clock, agents, {}, stop_after="mask")  # every masked vector is in
    assert len(first.ledger.updates("s", 1)) == len(AGENTS) and first.round == 0
    first.ledger.close()  # the aggregator dies before unmasking

    again, clock, summaries = _engine(tmp_path, clock)
    stages = _drive(again, clock, agents, {})
    assert stages == ["advertise", "share", "mask", "unmask"]
    assert summaries[-1].method["secagg_survivors"] == len(AGENTS)
    state, _ = again.method.state()
    for name in states["a"]:
        mean = sum(states[a][name].double() for a in AGENTS) / len(AGENTS)
        assert (state[name].double() - mean).abs().max().item() <= 1e-6


class Injecting(SecureClient):
    """Masks honestly, then adds a huge constant to its masked vector (the server cannot look
    inside a masked vector; the unmasked sum shows it)."""

    def _train(self, task: TaskInput, ws: Workspace, entry: dict[str, Any], dp: Any) -> TaskOutput:  # type: ignore[override]
        import numpy as np

        from protocol.secagg import wire

        out = super()._train(task, ws, entry, dp)
        masked = wire.vector_from(out.blobs[wire.MASKED_BLOB], None).copy()
        masked += np.uint64(round(5e6 * 2**24))
        out.blobs[wire.MASKED_BLOB] = wire.vector_bytes(masked)
        return out


def test_an_agent_that_skips_the_clip_or_alters_its_masked_vector_fails_the_round(
    tmp_path: Path,
) -> None:
    """Before, one agent adding 5e6 to its masked vector set the global to 1.7e5 per value
    with secagg_failures 0: the unmasked sum is now held to what clipped agents can send."""
    engine, clock, summaries = _engine(tmp_path)
    agents: dict[str, SecureClient] = {
        a: SecureClient(FakeFedit(lora_state(1.0), 4)) for a in AGENTS[:-1]
    }
    agents[AGENTS[-1]] = Injecting(FakeFedit(lora_state(1.0), 4))
    _drive(engine, clock, agents, {})
    assert summaries[-1].method["secagg_failed"] == 1.0
    state, _ = engine.method.state()
    assert state == {}  # nothing applied


class OneTensor(SecureClient):
    """Answers with a one-tensor layout (masked honestly): with the model's layout known, it
    must not become the round's layout even when it comes first."""

    def _train(self, task: TaskInput, ws: Workspace, entry: dict[str, Any], dp: Any) -> TaskOutput:  # type: ignore[override]
        import numpy as np

        from protocol.secagg import wire

        out = super()._train(task, ws, entry, dp)
        layout = wire.layout_from(out.blobs[wire.LAYOUT_BLOB])
        name, shape = layout.entries[0]
        size = int(np.prod(shape))
        masked = wire.vector_from(out.blobs[wire.MASKED_BLOB], None)[:size].copy()
        out.blobs[wire.MASKED_BLOB] = wire.vector_bytes(masked)
        out.blobs[wire.LAYOUT_BLOB] = wire.layout_blob(wire.Layout([(name, shape)], layout.kind,
                                                                   layout.meta))  # fmt: skip
        return out


def test_with_the_model_a_wrong_first_layout_does_not_fix_the_round(tmp_path: Path) -> None:
    """Before, the first masked layout was the round's: one agent answering first with one
    tensor had every honest agent refused and the round fail, round after round, run.model_dir
    or not. Now the model's layout is the round's: the liar is refused, the others' mean holds."""
    from engine_harness import fake_model_dir

    engine, clock, summaries = _engine(tmp_path, model_dir=fake_model_dir(tmp_path / "model"))
    states = {a: lora_state(float(i)) for i, a in enumerate(AGENTS)}
    agents: dict[str, SecureClient] = {a: SecureClient(FakeFedit(states[a], 4)) for a in AGENTS}
    agents["a"] = OneTensor(FakeFedit(states["a"], 4))  # the first to answer
    _drive(engine, clock, agents, {})
    assert summaries[-1].method.get("secagg_failed") is None
    assert summaries[-1].method["secagg_survivors"] == len(AGENTS) - 1
    state, _ = engine.method.state()
    honest = [a for a in AGENTS if a != "a"]
    for name in states["b"]:
        mean = sum(states[a][name].double() for a in honest) / len(honest)
        assert (state[name].double() - mean).abs().max().item() < 1e-5
