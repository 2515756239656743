"""FedPipe, FedBiOT and SLoRA through a real regional tier: every part its own process.

An upstream aggregator (``serve``) has one agent of its own and one region (``region``) with two
agents; the agents are real daemons training a tiny Llama. The run must finish on both tiers,
the upstream must have taken the region's update with its agents' total, and what the region
served must be what the method needs: FedPipe's selection and per-agent ranks planned by the
region; FedBiOT's emulator sent to the region once and by the region to each of its agents;
SLoRA's switch from masked values (round 1) to LoRA (round 2) on both tiers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from aggregator.engine.intake import stored_payload
from aggregator.local.demo_data import make_demo_split, write_demo
from aggregator.store.ledger import Ledger
from aggregator.store.modelhash import weights_sha256
from protocol import payloads
from tests.aggregator.methods.test_fedbiot_server import PARAMS as FEDBIOT_PARAMS
from tests.aggregator.methods.test_fedbiot_server import make_tiny

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# Heartbeats every 0.3 s; an agent is dropped after 40 missed (12 s): generous enough that a
# training step on a loaded 2-core box (heartbeats starved for seconds) does not drop it.
FAST = {"heartbeat_interval": 0.3, "liveness": 40}
FEDPIPE_PARAMS: dict[str, Any] = {
    "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
    "train": {"steps": 2, "batch_size": 2, "max_len": 48},
    "score": {"batches": 1, "batch_size": 2, "max_len": 48},
    "select": {"count": 4},
    "plan": {"ranks": [2, 4], "batch_sizes": [2], "quants": ["fp32"], "capacity": 0.0},
}
SLORA_PARAMS: dict[str, Any] = {
    "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
    "train": {"steps": 2, "batch_size": 2, "max_len": 48},
    "sparse": {"stage1_rounds": 1, "density": 0.05},
}
PARAMS = {"fedpipe": FEDPIPE_PARAMS, "fedbiot": FEDBIOT_PARAMS, "slora": SLORA_PARAMS}
AGENTS = {"up": ["edge-0"], "east": ["edge-1", "edge-2"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiers")
    model_dir, files = make_tiny(root, embedded_tokenizer)
    data = write_demo(root / "data3", make_demo_split(3, per_agent=12, n_eval=8, n_public=8))
    return {**data, "model": model_dir, "public": files["public"]}  # 40 public records


def toml(path: Path, values: dict[str, dict[str, Any]]) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from load_harness import toml as render

    path.write_text(render(values))
    return path


@pytest.mark.parametrize("method", ["fedpipe", "fedbiot", "slora"])
def test_a_region_runs_the_method_end_to_end(
    method: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from load_harness import free_port

    model, sha = tiny["model"], weights_sha256(tiny["model"])
    params = PARAMS[method]
    ports = {"up": free_port(), "east": free_port()}
    run = {"method": method, "model": str(model), "model_sha256": sha, "eval": False,
           "round_deadline_s": 120.0, "quant": "fp32"}  # fmt: skip
    up = toml(tmp_path / "up.toml", {
        "server": {"bind": f"tcp://127.0.0.1:{ports['up']}", "state_dir": str(tmp_path / "up"),
                   "keep_updates": True, **FAST},
        "security": {"insecure": True, "regions": ["east"]},
        "run": {"run_id": "up", "rounds": 2, "min_agents": 2, "model_dir": str(model),
                "public_data": str(tiny["public"]), **run},
        "method": params,
    })  # fmt: skip
    east = toml(tmp_path / "east.toml", {
        "server": {"bind": f"tcp://127.0.0.1:{ports['east']}",
                   "state_dir": str(tmp_path / "east"), **FAST},
        "security": {"insecure": True},
        "run": {"run_id": "region-east", "min_agents": 2, "model_dir": str(model), **run},
        "upstream": {"endpoint": f"tcp://127.0.0.1:{ports['up']}", "id": "east",
                     "insecure": True, **FAST},
        "method": params,
    })  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    logs: list[Any] = []

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        logs.append(open(tmp_path / f"{name}.log", "wb"))  # noqa: SIM115
        return subprocess.Popen([sys.executable, "-m", *args], stdout=logs[-1],
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip

    servers = [start("up", "aggregator", "serve", "--config", str(up), "--exit-when-done"),
               start("east", "aggregator", "region", "--config", str(east))]  # fmt: skip
    agents = []
    for tier, ids in AGENTS.items():
        for agent_id in ids:
            i = int(agent_id.split("-")[1])
            config = toml(tmp_path / f"{agent_id}.toml", {
                "agent": {"id": agent_id, "aggregator": f"tcp://127.0.0.1:{ports[tier]}",
                          "state_dir": str(tmp_path / agent_id), "model": str(model),
                          "data": str(tiny[f"agent-{i}"]), "eval_data": str(tiny["eval"]),
                          "threads": 1, "reconnect_min": 0.2, "reconnect_max": 1.0, **FAST},
                "security": {"insecure": True},
            })  # fmt: skip
            agents.append(start(agent_id, "edge_agent", "run", "--config", str(config)))
    try:
        codes = wait_all(servers, timeout=240)
    finally:
        for p in servers + agents:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    text = {p.stem: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
    assert codes == [0, 0], {k: v[-3000:] for k, v in text.items()}

    ledger = Ledger(tmp_path / "up" / "ledger.sqlite")
    examples = {}
    kinds: dict[tuple[int, str], str] = {}
    for rnd in (1, 2):
        rows = {u.agent_id: u.num_examples for u in ledger.updates("up", rnd)}
        assert sorted(rows) == ["east", "edge-0"], (rnd, rows, text["up"][-3000:])
        examples[rnd] = rows
        for u in ledger.updates("up", rnd):
            assert u.blob_path is not None  # keep_updates
            payload = payloads.decode(memoryview(stored_payload(u)))
            kinds[(rnd, u.agent_id)] = payload.kind.value
    ledger.close()
    if method == "slora":  # stage 1 in round 1, the switch, stage 2 in round 2, on both tiers
        assert kinds == {(1, "east"): "masked", (1, "edge-0"): "masked",
                         (2, "east"): "lora", (2, "edge-0"): "lora"}, kinds  # fmt: skip
        assert "SVD switch computed" in text["up"]
    region = Ledger(tmp_path / "east" / "ledger.sqlite")
    for rnd in (1, 2):
        rows = {u.agent_id: u.num_examples for u in region.updates("region-east", rnd)}
        assert sorted(rows) == ["edge-1", "edge-2"]
        assert examples[rnd]["east"] == sum(rows.values())  # the region's total upstream
    region.close()
    if method == "fedpipe":
        assert "fedpipe: selected 4 of" in text["up"]  # the selection came from relayed scores
        assert "east gets" not in text["up"]  # the upstream plans no ranks for a region
        assert "edge-1 gets" in text["east"] and "edge-2 gets" in text["east"]
    elif method == "fedbiot":
        assert "fedbiot: region holds emulator" in text["east"]
        accepted = re.findall(
            r"round (\d+): accepted update from (\S+) \(\d+ examples, \d+ bytes up, (\d+) bytes down",
            text["east"],
        )
        down = {(int(r), a): int(n) for r, a, n in accepted}
        for agent_id in AGENTS["east"]:
            # round 1: the region sent the emulator (MBs); round 2 only the alignment delta
            assert down[(1, agent_id)] > 1_000_000 and down[(2, agent_id)] < 100_000, down
            assert "on emulator v2" in text[agent_id]  # the upstream's alignment, via the region


def wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[int | None]:
    """Exit codes once all have exited, or as soon as one fails (the others are then killed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            return codes
        time.sleep(0.2)
    return [p.poll() for p in procs]
