"""The Prometheus endpoint of a real aggregator service, scraped over HTTP during a run."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from aggregator.engine.service import AggregatorService
from aggregator.ops.config import build_config
from protocol import payloads
from protocol.frames import decode, encode
from protocol.messages import BaseModelRef, Hello, TaskAssign, TaskResult

from engine_harness import PROFILE, SHA, lora_state  # isort: skip

DEADLINE_S = 60.0


class Running:
    def __init__(self, tmp: Path) -> None:
        raw = {
            "server": {
                "bind": "tcp://127.0.0.1:0",
                "state_dir": str(tmp / "state"),
                "metrics_port": 0,
            },
            "security": {"insecure": True},
            "run": {"model_sha256": SHA, "min_agents": 1, "rounds": 2, "eval": False},
            "method": {"lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj"]}},
        }
        self.service = AggregatorService(build_config(raw), BaseModelRef(name="m", sha256=SHA))
        self.thread = threading.Thread(target=self.service.run, daemon=True)
        self.thread.start()
        assert self.service.bound.wait(DEADLINE_S)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, b"a1")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.service.endpoint)

    def send(self, header: object, blobs: dict[str, bytes] | None = None) -> None:
        self.sock.send_multipart([bytes(f) for f in encode(header, blobs)])  # type: ignore[arg-type]

    def next_assign(self) -> TaskAssign:
        while self.sock.poll(int(DEADLINE_S * 1000)):
            header = decode(self.sock.recv_multipart()).header
            if isinstance(header, TaskAssign):
                return header
        raise AssertionError("no task assigned")

    def scrape(self) -> dict[str, float]:
        port = self.service.metrics.port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
            text = reply.read().decode()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return values

    def close(self) -> None:
        self.service.should_exit.set()
        self.thread.join(DEADLINE_S)
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path)
    yield r
    r.close()


def result(assign: TaskAssign, task_id: str | None = None) -> tuple[TaskResult, dict[str, bytes]]:
    header = TaskResult(
        run_id=assign.run_id,
        round=assign.round,
        task_id=task_id or assign.task_id,
        agent_id="a1",
        method="fedit",
        num_examples=10,
        metrics={"train_loss": 1.0},
    )
    blob = payloads.encode_lora(lora_state(1.0), method="fedit", round=assign.round)
    return header, {"update": blob}


def test_metrics_are_served_during_a_run(running: Running) -> None:
    p = "edgefed_aggregator_"
    running.send(Hello(agent_id="a1", versions=[1], profile=PROFILE, models=[SHA]))
    first = running.next_assign()
    stale, blobs = result(first, task_id="not-a-task")
    running.send(stale, blobs)
    running.send(*result(first))
    second = running.next_assign()  # round 1 committed, round 2 assigned
    assert second.round == 2
    m = running.scrape()
    assert m[f"{p}rounds_completed_total"] == 1.0
    assert m[f"{p}round"] == 1.0
    assert m[f"{p}round_duration_seconds_count"] == 1.0
    assert m[f"{p}updates_accepted_total{{kind=train}}"] == 1.0
    assert m[f"{p}updates_rejected_total{{code=STALE_TASK}}"] == 1.0
    assert m[f"{p}agents_connected"] == 1.0
    assert m[f"{p}bytes_received_total"] > 2 * len(blobs["update"])
    assert m[f"{p}bytes_sent_total"] > 0
    assert m[f"{p}ledger_write_seconds_count{{op=record_update}}"] == 1.0
    assert m[f"{p}ledger_write_seconds_count{{op=commit_round}}"] >= 1.0
    assert m[f"{p}checkpoint_write_seconds_count"] >= 1.0
