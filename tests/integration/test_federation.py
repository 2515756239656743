"""Real federations on loopback: the aggregator, agent processes, CURVE, kills and restarts.

Agents run as separate processes (``python -m edge_agent run``) on a tiny randomly initialised
Llama; the aggregator runs in this process (a thread) or as its own process where a test kills it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from federation import Federation, free_port, ledger_of, toml_text, wait_for
from federation import serve as serve_process

from aggregator.engine.intake import stored_payload
from aggregator.engine.service import AggregatorService
from aggregator.ops.config import build_config
from protocol.messages import BaseModelRef

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


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
    # the premise: edge-2 died with round 1 open and nothing of it accepted (else the test
    # would not exercise the reassignment after its return)
    with ledger_of(fed) as ledger:
        delivered = [u.agent_id for u in ledger.updates("it", 1)]
    assert "edge-2" not in delivered, "edge-2 delivered before it was killed; kill it sooner"
    phase = service.engine.phase
    assert phase is not None and phase.round == 1
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
        decoded = [(u.num_examples, payloads.decode(stored_payload(u)).tensors) for u in rows]
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
    port = free_port()
    fed.raw["server"]["bind"] = f"tcp://127.0.0.1:{port}"
    config = tmp_path / "aggregator.toml"
    config.write_text(toml_text(fed.raw), encoding="utf-8")
    checkpoints = tmp_path / "state" / "checkpoints"

    def serve(*args: str) -> subprocess.Popen[bytes]:
        return serve_process(config, tmp_path / "aggregator.log", None, *args)

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
        agg = serve("--exit-when-done")
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
