"""Secure aggregation in real rounds: an aggregator thread and agent processes over CURVE.

The same tiny-model federation runs twice, plain and with ``[privacy] secure_aggregation``;
the committed global adapters agree within the documented fixed-point error, and the secure
run's ledger and state directory hold no individual update.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from aggregator.engine.service import AggregatorService
from aggregator.local.demo_data import make_demo_split, write_demo
from aggregator.local.workdir import make_keys, write_agent_config
from aggregator.ops.config import build_config
from aggregator.store.ledger import Ledger
from aggregator.store.modelhash import weights_sha256
from protocol.messages import BaseModelRef
from protocol.secagg.fixedpoint import sum_error_bound

pytestmark = pytest.mark.slow

FAST = {"heartbeat_interval": 0.5, "liveness": 40}  # 20 s: a loaded 2-core box stalls agents
AGENTS = 3


FEDIT = {
    "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
    "train": {"steps": 2, "batch_size": 2, "lr": 5e-3, "max_len": 64},
}


def _run(
    work: Path,
    model_dir: Path,
    privacy: dict[str, Any],
    method: str = "fedit",
    params: dict[str, Any] = FEDIT,
) -> Path:
    """One two-round federation of three agent processes; returns its state dir."""
    sha = weights_sha256(model_dir)
    ids = [f"edge-{i + 1}" for i in range(AGENTS)]
    files = write_demo(work / "data", make_demo_split(AGENTS, per_agent=12, n_eval=6, seed=1))
    keys = make_keys(work, ids)
    raw = {
        "server": {"bind": "tcp://127.0.0.1:0", "state_dir": str(work / "state"), **FAST},
        "security": {"secret_key": str(keys["server_secret"]), "allow_dir": str(keys["allow"])},
        "run": {
            "method": method,
            "run_id": "sa",
            "rounds": 2,
            "min_agents": AGENTS,
            "model": str(model_dir),
            "model_sha256": sha,
            "quant": "fp32",
            "eval": False,
            "round_deadline_s": 120.0,
        },
        "method": params,
        "privacy": privacy,
    }
    service = AggregatorService(build_config(raw), BaseModelRef(name="tiny", sha256=sha))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    assert service.bound.wait(10)
    procs = []
    for i, agent_id in enumerate(ids):
        cfg = work / f"{agent_id}.toml"
        write_agent_config(
            cfg,
            {
                "agent": {
                    "id": agent_id,
                    "aggregator": service.endpoint,
                    "state_dir": str(work / agent_id),
                    "model": str(model_dir),
                    "data": str(files[f"agent-{i}"]),
                    "eval_data": str(files["eval"]),
                    "threads": 1,
                    **FAST,
                },
                "security": {
                    "secret_key": str(keys["dir"] / f"{agent_id}.key_secret"),
                    "server_public_key": str(keys["server_public"]),
                },
            },
        )
        log = open(work / f"{agent_id}.log", "ab")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": os.getcwd()},
            )
        )
        log.close()
    try:
        thread.join(timeout=300)
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in work.glob("*.log"))
        assert not thread.is_alive(), logs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return work / "state"


def test_secure_rounds_give_the_plain_global_and_store_no_update(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    plain = _run(tmp_path / "plain", tiny_model_dir, {})
    secure = _run(tmp_path / "secure", tiny_model_dir, {"secure_aggregation": True})

    with Ledger(secure / "ledger.sqlite") as ledger:
        for r in (1, 2):
            rows = ledger.updates("sa", r)
            assert sorted(u.agent_id for u in rows) == [f"edge-{i + 1}" for i in range(AGENTS)]
            # the ledger keeps who sent and how many examples, never a payload or its hash
            assert all(u.blob_path is None and u.sha256 == "" for u in rows)
        assert ledger.rejections("sa") == []
        metrics = ledger.rounds("sa")[-1].metrics
    assert metrics["agents"] == AGENTS and metrics["secagg_survivors"] == AGENTS
    assert not list((secure / "updates").rglob("*.safetensors"))

    bound = sum_error_bound(AGENTS, 24)  # on the weighted sum; the mean's error is smaller
    first = {
        k: load_file(str(s / "checkpoints" / "round-000001" / "global.safetensors"))
        for k, s in (("plain", plain), ("secure", secure))
    }
    assert first["plain"].keys() == first["secure"].keys()
    for name, value in first["plain"].items():
        diff = (value - first["secure"][name]).abs().max().item()
        assert diff <= bound, (name, diff)
    differs = [not torch.equal(v, first["secure"][k]) for k, v in first["plain"].items()]
    assert any(differs)  # it did go through fixed point, not a copy of the plain path
    last = {
        k: load_file(str(s / "checkpoints" / "round-000002" / "global.safetensors"))
        for k, s in (("plain", plain), ("secure", secure))
    }
    for name, value in last["plain"].items():
        torch.testing.assert_close(last["secure"][name], value, rtol=0, atol=1e-5)


def test_distributed_dp_with_secure_aggregation_reports_epsilon_per_round(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from click.testing import CliRunner

    from aggregator.cli import main
    from aggregator.privacy import dp

    privacy = {"secure_aggregation": True, "dp": "central", "dp_clip": 0.05,
               "noise_multiplier": 1.2, "delta": 1e-5}  # fmt: skip
    state = _run(tmp_path, tiny_model_dir, privacy)
    with Ledger(state / "ledger.sqlite") as ledger:
        rounds = ledger.rounds("sa")
        eps = [r.metrics["dp_epsilon"] for r in rounds]
        assert eps == pytest.approx([dp.epsilon("central", 1.2, 1.0, r, 1e-5) for r in (1, 2)])
        assert eps[0] < eps[1]
        # every agent clipped its change to 0.05 (a LoRA round moves it more than that)
        scales = [u.metrics["dp_clip_scale"] for r in (1, 2) for u in ledger.updates("sa", r)]
        assert len(scales) == 2 * AGENTS and all(0 < s < 1 for s in scales)
    shown = CliRunner().invoke(main, ["status", "--state-dir", str(state)])
    assert shown.exit_code == 0, shown.output
    assert f"ε={eps[1]:.3f} (δ=1e-05)" in shown.output


def test_slora_stage_one_values_and_stage_two_factors_go_through_secure_aggregation(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    params = {**FEDIT, "sparse": {"stage1_rounds": 1, "density": 0.05}}
    plain = _run(tmp_path / "plain", tiny_model_dir, {}, "slora", params)
    secure = _run(
        tmp_path / "secure", tiny_model_dir, {"secure_aggregation": True}, "slora", params
    )
    with Ledger(secure / "ledger.sqlite") as ledger:
        rounds = ledger.rounds("sa")
        assert [r.metrics["stage"] for r in rounds] == [1.0, 2.0]
        assert all(r.metrics["secagg_survivors"] == AGENTS for r in rounds)
        assert all(u.blob_path is None for r in (1, 2) for u in ledger.updates("sa", r))
    # stage 1: the averaged masked values agree within the fixed-point bound
    values = {
        k: load_file(str(s / "checkpoints" / "round-000001" / "global.safetensors"))
        for k, s in (("plain", plain), ("secure", secure))
    }
    assert values["plain"].keys() == values["secure"].keys() and values["plain"]
    for name, value in values["plain"].items():
        diff = (value - values["secure"][name]).abs().max().item()
        assert diff <= sum_error_bound(AGENTS, 24), (name, diff)
    # stage 2 starts from the SVD of that sum: the same adapter shapes
    last = {
        k: load_file(str(s / "checkpoints" / "round-000002" / "global.safetensors"))
        for k, s in (("plain", plain), ("secure", secure))
    }
    assert {k: v.shape for k, v in last["plain"].items()} == {
        k: v.shape for k, v in last["secure"].items()
    }
