"""A real two-tier run: an upstream aggregator, two regional tiers, light agents, all processes.

The upstream sees two "agents" (the regions); each region sees two light agents (the load
harness's, which answer every train task with a LoRA update of known numbers). The upstream's
committed global state must be the flat example-weighted mean of the four agents' updates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from aggregator.store.ledger import Ledger

ROOT = Path(__file__).resolve().parents[2]
SHA = "cd" * 32  # what the light agents announce
REGIONS = {"east": [0, 1], "west": [2, 3]}  # light agent indices per region


def aggregator(*args: str) -> list[str]:
    return [sys.executable, "-m", "aggregator", *args]


def test_two_tier_processes_commit_the_flat_mean(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from aggregator_throughput import lora_update
    from load_harness import free_port, toml

    up_port = free_port()
    lora = {"r": 8, "alpha": 16.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    fast = {"heartbeat_interval": 0.3, "liveness": 10}
    run = {"model_sha256": SHA, "eval": False, "round_deadline_s": 120.0}
    (tmp_path / "up.toml").write_text(toml({
        "server": {"bind": f"tcp://127.0.0.1:{up_port}", "state_dir": str(tmp_path / "up"), **fast},
        "security": {"insecure": True, "regions": list(REGIONS)},
        "run": {"run_id": "up", "rounds": 2, "min_agents": 2, **run},
        "method": {"lora": lora},
    }))  # fmt: skip
    files = []

    def log(name: str) -> Any:
        files.append(open(tmp_path / f"{name}.log", "wb"))  # noqa: SIM115
        return files[-1]

    procs = [subprocess.Popen(aggregator("serve", "--config", str(tmp_path / "up.toml")),
                              stdout=subprocess.DEVNULL, stderr=log("up"))]  # fmt: skip
    lights = []
    for name, agents in REGIONS.items():
        port = free_port()
        (tmp_path / f"{name}.toml").write_text(toml({
            "server": {"bind": f"tcp://127.0.0.1:{port}", "state_dir": str(tmp_path / name), **fast},
            "security": {"insecure": True},
            "run": {"run_id": f"region-{name}", "min_agents": len(agents), **run},
            "method": {"lora": lora},
            "upstream": {"endpoint": f"tcp://127.0.0.1:{up_port}", "id": name, "insecure": True,
                         **fast},
        }))  # fmt: skip
        procs.append(subprocess.Popen(aggregator("region", "--config", str(tmp_path / f"{name}.toml")),
                                      stdout=subprocess.DEVNULL, stderr=log(name)))  # fmt: skip
        lights.append(subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "_light_agents.py"), "--endpoint",
             f"tcp://127.0.0.1:{port}", "--first", str(agents[0]), "--count", str(len(agents)),
             "--timeout", "150"],
            stdout=subprocess.PIPE, text=True,
        ))  # fmt: skip
    try:
        counts = [
            json.loads(p.communicate(timeout=180)[0].strip().splitlines()[-1]) for p in lights
        ]
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs + lights:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    logs = {f.name: f.read_text()[-2000:] for f in tmp_path.glob("*.log")}
    assert codes == [0, 0, 0], logs
    assert [c["updates_acked"] for c in counts] == [4, 4] and all(
        c["finished"] == 2 for c in counts
    )

    ledger = Ledger(tmp_path / "up" / "ledger.sqlite")
    for rnd in (1, 2):
        rows = {u.agent_id: u.num_examples for u in ledger.updates("up", rnd)}
        assert rows == {n: sum(10 + i % 7 for i in a) for n, a in REGIONS.items()}
    ledger.close()
    weights = {i: 10 + i % 7 for a in REGIONS.values() for i in a}
    states = {i: lora_update(8, i, "qkvo") for i in weights}
    total = sum(weights.values())
    final = load_file(str(tmp_path / "up" / "checkpoints" / "round-000002" / "global.safetensors"))
    assert final.keys() == states[0].keys()
    for name, value in final.items():
        flat = sum(weights[i] * states[i][name].double() for i in weights) / total
        torch.testing.assert_close(value, flat.float(), rtol=1e-6, atol=1e-7)
