"""An in-process harness around the round engine: simulated agents, real payloads, no sockets."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from aggregator.engine.engine import Outgoing, RoundEngine, RoundSummary
from aggregator.methods import MethodContext
from aggregator.methods.fedit.server import FeditServer
from aggregator.ops.config import build_config
from aggregator.store.checkpoint import CheckpointStore
from aggregator.store.ledger import Ledger
from protocol import payloads
from protocol.frames import Decoded, decode, encode
from protocol.messages import BaseModelRef, Hello, Profile, TaskAssign, TaskResult, Welcome

SHA = "cd" * 32
MODEL = BaseModelRef(name="tiny", sha256=SHA)
PROFILE = Profile(
    hostname="h",
    os="Linux",
    python="3.11",
    torch="2.13",
    cpus=2,
    ram_total=1 << 34,
    ram_available=1 << 33,
    disk_free=1 << 35,
)
NAMES = [
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
]
SHAPES = {NAMES[0]: (4, 16), NAMES[1]: (16, 4)}


def lora_state(value: float) -> dict[str, torch.Tensor]:
    return {
        n: torch.full(s, value) + torch.arange(s[0] * s[1]).reshape(s) / 100
        for n, s in SHAPES.items()
    }


def fake_model_dir(path: Path) -> Path:
    """A base model's safetensors header for the harness's layout: one q_proj of 16 x 16, as
    the LoRA layout is derived from it (zeros: only names and shapes are read)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    weights = {
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(16, 16),
        "model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 16),
    }
    save_file(weights, str(path / "model.safetensors"))
    return path


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(
        self,
        state_dir: Path,
        method: dict[str, Any] | None = None,
        regions: tuple[str, ...] = (),
        model_dir: Path | None = None,
        **run: Any,
    ) -> None:
        """``model_dir``: a base model the method may read (e.g. :func:`fake_model_dir`)."""
        raw = {
            "server": {"state_dir": str(state_dir), "heartbeat_interval": 1.0, "liveness": 3},
            "security": {"insecure": True, "regions": list(regions)},
            "run": {
                "run_id": "run-t",
                "rounds": 2,
                "min_agents": 2,
                "eval": False,
                "model_sha256": SHA,
                "round_deadline_s": 60.0,
                **run,
            },
            "method": {
                "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj"]},
                # the synthetic updates (values ~1-5) lie above the default ΔW bound: off here
                "aggregation": {"clip_norm": 0.0},
                **(method or {}),
            },
        }
        self.config = build_config(raw)
        self.clock = Clock()
        self.ledger = Ledger(state_dir / "ledger.sqlite")
        self.store = CheckpointStore(state_dir / "checkpoints")
        self.method = FeditServer(self.config.method, MethodContext(model_dir=model_dir))
        self.summaries: list[RoundSummary] = []
        self.engine = RoundEngine(
            self.config,
            self.method,
            MODEL,
            ledger=self.ledger,
            store=self.store,
            clock=self.clock,
            on_round=self.summaries.append,
        )
        self.engine.start()

    def send(
        self, agent_id: str, header: Any, blobs: dict[str, bytes] | None = None
    ) -> list[Outgoing]:
        msg: Decoded = decode(encode(header, blobs))
        return self.engine.on_message(agent_id, msg, self.clock.now)

    def hello(self, agent_id: str) -> list[Outgoing]:
        return self.send(
            agent_id, Hello(agent_id=agent_id, versions=[1], profile=PROFILE, models=[SHA])
        )

    def tick(self, advance: float = 0.1) -> list[Outgoing]:
        self.clock.now += advance
        return self.engine.tick(self.clock.now)

    def result(
        self,
        assign: TaskAssign,
        agent_id: str,
        n: int,
        state: dict[str, torch.Tensor],
        *,
        nan: bool = False,
        **kw: Any,
    ) -> list[Outgoing]:
        blob = payloads.encode_lora(state, method="fedit", round=assign.round)
        if nan:  # a hostile agent: the encoder refuses NaN, so poke it into the bytes
            marker = struct.pack("<f", 12345.0)
            assert blob.count(marker) == 1
            blob = blob.replace(marker, struct.pack("<f", float("nan")))
        header = TaskResult(
            run_id=assign.run_id,
            round=assign.round,
            task_id=assign.task_id,
            agent_id=agent_id,
            method="fedit",
            num_examples=n,
            metrics={"train_loss": 1.0},
            **kw,
        )
        return self.send(agent_id, header, {"update": blob})

    def close(self) -> None:
        self.engine.intake.close()
        self.ledger.close()


def assigns(out: list[Outgoing]) -> dict[str, TaskAssign]:
    return {o.agent_id: o.header for o in out if isinstance(o.header, TaskAssign)}


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def start_round(h: Harness, agents: list[str]) -> dict[str, TaskAssign]:
    for a in agents:
        out = h.hello(a)
        assert isinstance(out[0].header, Welcome)
    return assigns(h.tick())


def next_tasks(h: Harness, kind: str) -> dict[str, TaskAssign]:
    """Tick until the engine hands out ``kind`` tasks (a phase closes on one tick, the next
    opens on another); those tasks by agent."""
    for _ in range(5):
        tasks = assigns(h.tick())
        if tasks:
            assert {t.kind for t in tasks.values()} == {kind}
            return tasks
    raise AssertionError(f"no {kind} tasks")
