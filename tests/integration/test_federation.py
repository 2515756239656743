"""Real federations on loopback: the aggregator, agent processes, CURVE, kills and restarts.

Agents run as separate processes (``python -m edge_agent run``) on a tiny randomly initialised
Llama; the aggregator runs in this process (a thread) or as its own process where a test kills it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from aggregator.engine.service import AggregatorService
from aggregator.local.demo_data import make_demo_split, write_demo
from aggregator.local.workdir import make_keys, write_agent_config
from aggregator.ops.config import build_config
from aggregator.store.ledger import Ledger
from aggregator.store.modelhash import weights_sha256
from protocol.messages import BaseModelRef

pytestmark = pytest.mark.slow

FAST = {"heartbeat_interval": 0.25, "liveness": 12}


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


def method_params() -> dict[str, Any]:
    return {
        "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
        "train": {"steps": 3, "batch_size": 2, "lr": 5e-3, "max_len": 64},
        "eval": {"max_examples": 6, "max_new_tokens": 4, "batch_size": 6},
    }


class Federation:
    """Data, keys and configs for one aggregator and N agents in a work dir."""

    def __init__(
        self, work: Path, model_dir: Path, agents: int, *, rounds: int, eval: bool
    ) -> None:
        self.work = work
        self.model_dir = model_dir
        self.sha = weights_sha256(model_dir)
        self.agent_ids = [f"edge-{i + 1}" for i in range(agents)]
        split = make_demo_split(agents, per_agent=16, n_eval=12, n_public=8, seed=1)
        self.files = write_demo(work / "data", split)
        self.keys = make_keys(work, self.agent_ids)
        self.raw: dict[str, Any] = {
            "server": {
                "bind": "tcp://127.0.0.1:0",
                "state_dir": str(work / "state"),
                "keep_updates": True,  # the test recomputes FedAvg from the stored updates
                **FAST,
            },
            "security": {
                "secret_key": str(self.keys["server_secret"]),
                "allow_dir": str(self.keys["allow"]),
            },
            "run": {
                "run_id": "it",
                "rounds": rounds,
                "min_agents": agents,
                "model": str(model_dir),
                "model_sha256": self.sha,
                "quant": "fp32",
                "eval": eval,
                "eval_initial": False,
                "round_deadline_s": 120.0,
            },
            "method": method_params(),
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def agent_config(self, agent_id: str, endpoint: str) -> Path:
        i = self.agent_ids.index(agent_id)
        path = self.work / f"{agent_id}.toml"
        write_agent_config(
            path,
            {
                "agent": {
                    "id": agent_id,
                    "aggregator": endpoint,
                    "state_dir": str(self.work / agent_id),
                    "model": str(self.model_dir),
                    "data": str(self.files[f"agent-{i}"]),
                    "eval_data": str(self.files["eval"]),
                    "threads": 1,
                    "reconnect_min": 0.2,
                    "reconnect_max": 1.0,
                    **FAST,
                },
                "security": {
                    "secret_key": str(self.keys["dir"] / f"{agent_id}.key_secret"),
                    "server_public_key": str(self.keys["server_public"]),
                },
            },
        )
        return path

    def start_agent(self, agent_id: str, endpoint: str) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{agent_id}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edge_agent",
                "run",
                "--config",
                str(self.agent_config(agent_id, endpoint)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        log.close()
        self.procs[agent_id] = proc
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in self.work.glob("*.log")
        )


def wait_for(predicate: Any, timeout: float, what: str, fed: Federation | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{fed.logs() if fed else ''}")


def ledger_of(fed: Federation) -> Ledger:
    return Ledger(fed.work / "state" / "ledger.sqlite")


@pytest.fixture
def fed3(tmp_path: Path, tiny_dir: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, tiny_dir, 3, rounds=2, eval=True)
    yield fed
    fed.stop_all()


def test_three_agents_curve_kill_one_mid_round(fed3: Federation) -> None:
    fed = fed3
    service = AggregatorService(build_config(fed.raw), BaseModelRef(name="tiny", sha256=fed.sha))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    assert service.bound.wait(10)
    for agent_id in fed.agent_ids:
        fed.start_agent(agent_id, service.endpoint)

    # kill edge-2 while round 1 is open, before it delivered; bring it back
    wait_for(lambda: service.engine.phase is not None, 90, "round 1 to start", fed)
    victim = fed.procs["edge-2"]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    fed.start_agent("edge-2", service.endpoint)

    thread.join(timeout=240)
    assert not thread.is_alive(), fed.logs()
    with ledger_of(fed) as ledger:
        rounds = ledger.rounds("it")
        assert [r.round for r in rounds] == [1, 2]
        assert all(r.committed_at is not None for r in rounds)
        for r in (1, 2):
            updates = ledger.updates("it", r)
            # exactly one accepted update per agent per round: nothing lost, nothing twice
            assert sorted(u.agent_id for u in updates) == fed.agent_ids
            assert all(u.num_examples > 0 and u.bytes_up > 0 for u in updates)
        metrics = rounds[-1].metrics
        assert metrics["agents"] == 3.0
        assert 0.0 < metrics["train_loss"] < 20.0
        assert 0.0 < metrics["eval_loss"] < 20.0
        assert 0.0 <= metrics["eval_em"] <= 1.0
        assert ledger.rejections("it") == []
        # the committed global state is the offline FedAvg of exactly the recorded updates
        from safetensors.torch import load_file as load_tensors

        from protocol import payloads

        rows = ledger.updates("it", 2)
        total = sum(u.num_examples for u in rows)
        decoded = [
            (u.num_examples, payloads.decode(Path(str(u.blob_path)).read_bytes()).tensors)
            for u in rows
        ]
        ckpt = load_tensors(
            str(fed.work / "state" / "checkpoints" / "round-000002" / "global.safetensors")
        )
        for name, value in ckpt.items():
            offline = sum(n * t[name].double() for n, t in decoded) / total
            torch.testing.assert_close(value, offline.float(), rtol=0, atol=1e-6)

    # the exported adapter loads with stock peft on the base and generates
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = service.export(fed.work / "export")
    base = AutoModelForCausalLM.from_pretrained(fed.model_dir)
    model = PeftModel.from_pretrained(base, out["adapter"])
    tokenizer = AutoTokenizer.from_pretrained(fed.model_dir)
    ids = tokenizer("Reverse the word: cat", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3
    state = service.method.state()[0]
    name = next(k for k in state if k.endswith("q_proj.lora_B.weight"))
    loaded = dict(model.named_parameters())
    peft_name = name.replace(".lora_B.weight", ".lora_B.default.weight")
    torch.testing.assert_close(loaded[peft_name].detach(), state[name], rtol=0, atol=0)


def test_aggregator_sigkill_between_rounds_resumes(tmp_path: Path, tiny_dir: Path) -> None:
    fed = Federation(tmp_path, tiny_dir, 2, rounds=3, eval=False)
    port = _free_port()
    fed.raw["server"]["bind"] = f"tcp://127.0.0.1:{port}"
    config = tmp_path / "aggregator.toml"
    config.write_text(_toml(fed.raw), encoding="utf-8")
    checkpoints = tmp_path / "state" / "checkpoints"

    def serve() -> subprocess.Popen[bytes]:
        log = open(tmp_path / "aggregator.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "aggregator", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        log.close()
        return proc

    def committed() -> dict[int, dict[str, Any]]:
        return {
            int(d.name.split("-")[1]): json.loads((d / "manifest.json").read_text())
            for d in checkpoints.glob("round-*")
            if (d / "manifest.json").exists()
        }

    agg = serve()
    try:
        for agent_id in fed.agent_ids:
            fed.start_agent(agent_id, f"tcp://127.0.0.1:{port}")
        end = time.monotonic() + 180
        while not committed() and time.monotonic() < end:
            time.sleep(0.02)
        agg.send_signal(signal.SIGKILL)
        agg.wait()
        before = committed()
        assert before and max(before) < 3, f"the kill came too late: {sorted(before)}"
        agg = serve()
        assert agg.wait(timeout=180) == 0, fed.logs()
    finally:
        if agg.poll() is None:
            agg.kill()
        fed.stop_all()
    after = committed()
    last = max(before)
    assert after[last] == before[last]  # what was committed before the kill is untouched
    with ledger_of(fed) as ledger:
        assert ledger.last_committed_round("it") == 3
        for r in (1, 2, 3):  # one update per agent per round, none lost or doubled
            assert sorted(u.agent_id for u in ledger.updates("it", r)) == fed.agent_ids
    log = (tmp_path / "aggregator.log").read_text()
    assert f"resumes after committed round {last}" in log


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(raw: dict[str, Any]) -> str:
    lines: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {json.dumps(v)}")
        for k, v in table.items():
            if isinstance(v, dict):
                emit(f"{prefix}.{k}", v)

    for section, table in raw.items():
        emit(section, table)
    return "\n".join(lines) + "\n"


def test_stopped_agent_is_dropped_from_its_round(tmp_path: Path, tiny_dir: Path) -> None:
    fed = Federation(tmp_path, tiny_dir, 3, rounds=1, eval=False)
    fed.raw["run"]["quorum"] = 0.6
    fed.raw["run"]["round_deadline_s"] = 600.0  # far away: the drop must come from liveness
    service = AggregatorService(build_config(fed.raw), BaseModelRef(name="tiny", sha256=fed.sha))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    assert service.bound.wait(10)
    try:
        for agent_id in fed.agent_ids:
            fed.start_agent(agent_id, service.endpoint)
        wait_for(lambda: service.engine.phase is not None, 90, "round 1 to start", fed)
        fed.procs["edge-3"].send_signal(signal.SIGSTOP)
        started = time.monotonic()
        thread.join(timeout=120)
        assert not thread.is_alive(), fed.logs()
        # dropped once silent for the liveness window (0.25 s x 12), long before the deadline
        assert time.monotonic() - started < 60
    finally:
        fed.procs["edge-3"].send_signal(signal.SIGCONT)
        fed.stop_all()
    with ledger_of(fed) as ledger:
        assert sorted(u.agent_id for u in ledger.updates("it", 1)) == ["edge-1", "edge-2"]
        assert ledger.last_committed_round("it") == 1
