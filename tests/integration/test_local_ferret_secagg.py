"""End to end: `edgefed-aggregator local --method ferret --secagg` on the tiny model, three agent
processes over CURVE. The same flags without ``--secagg`` give the same exported model within
the fixed-point error, and the secure run stores no individual update."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aggregator.store.ledger import Ledger

pytestmark = pytest.mark.slow


def _local(work: Path, model_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "aggregator", "local", "--method", "ferret",
        "--model", str(model_dir), "--quant", "fp32", "--agents", "3", "--rounds", "2",
        "--steps", "2", "--per-agent", "8", "--eval-examples", "4", "--batch-size", "2",
        "--lr", "0.05", "--param", "ferret.k=16", "--workdir", str(work), *extra,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=540,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_local_ferret_with_secure_aggregation_gives_the_plain_model(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    _local(tmp_path / "plain", tiny_model_dir)
    secure = _local(tmp_path / "secure", tiny_model_dir, "--secagg")
    results = {
        n: json.loads((tmp_path / n / "result.json").read_text()) for n in ("plain", "secure")
    }
    rows = {n: {r["round"]: r for r in res["rows"]} for n, res in results.items()}
    for r in (1, 2):
        assert rows["plain"][r]["agents"] == rows["secure"][r]["agents"] == 3.0
        # the masked grid: 8 bytes per (group, seed), more than the plain triples
        assert rows["secure"][r]["bytes_up_per_agent"] > rows["plain"][r]["bytes_up_per_agent"]
    assert "exported fine-tuned model" in secure.stdout
    weights = {
        n: load_file(str(Path(res["model"]) / "model.safetensors")) for n, res in results.items()
    }
    assert weights["plain"].keys() == weights["secure"].keys()
    for name, value in weights["plain"].items():
        torch.testing.assert_close(weights["secure"][name], value, rtol=1e-4, atol=1e-6)
    base = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    assert any(not torch.equal(base[n], v) for n, v in weights["secure"].items() if n in base)
    # the secure ledger has who sent and how many examples, never a payload
    (path,) = (tmp_path / "secure").rglob("ledger.sqlite")
    with Ledger(path) as ledger:
        (run_id,) = ledger.run_ids()
        for r in (1, 2):
            updates = ledger.updates(run_id, r)
            assert len(updates) == 3 and all(u.blob_path is None for u in updates)
        assert ledger.rounds(run_id)[-1].metrics["secagg_survivors"] == 3
    assert not list((tmp_path / "secure").rglob("updates/**/*.safetensors"))
