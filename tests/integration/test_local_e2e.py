"""End to end: `edgefed-aggregator local` on the embedded default model, with very few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_local_runs_the_default_model_and_exports_a_loadable_adapter(tmp_path: Path) -> None:
    work = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "aggregator", "local",
        "--agents", "2", "--rounds", "2", "--steps", "2", "--per-agent", "12",
        "--eval-examples", "8", "--batch-size", "2", "--workdir", str(work), "-v",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=540,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "round agents train loss eval loss Rouge-L eval EM" in out
    assert "exported PEFT adapter:" in out
    result = json.loads((work / "result.json").read_text())
    rows = {r["round"]: r for r in result["rows"]}
    assert sorted(rows) == [0, 1, 2]
    assert rows[1]["agents"] == 2.0 and rows[2]["agents"] == 2.0
    for r in (1, 2):
        assert 0 < rows[r]["train_loss"] < 20 and 0 < rows[r]["eval_loss"] < 20
        # the whole adapter goes up; round 1 comes down as a bare task (seeded initial adapter)
        assert rows[r]["bytes_up_per_agent"] > 1_000_000
    assert rows[1]["bytes_down_per_agent"] < 5_000 < rows[2]["bytes_down_per_agent"]
    # CURVE was on: the ZAP authenticator admitted the two agents' keys and refused an unknown
    # one in the start-up self-test, and no message of the run was refused
    log = proc.stderr
    assert "CURVE on: 2 agents allowed from" in log
    assert "self-test passed: an unknown CURVE key was refused" in log
    assert "insecure" not in log.lower()
    assert [
        line for line in log.splitlines() if "refused" in line and "self-test" not in line
    ] == []
    assert (work / "keys" / "allow" / "agent-1.key").exists()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_agent.model.store import DEFAULT_MODEL, resolve_model

    base_dir = resolve_model(DEFAULT_MODEL).path
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), result["adapter"]
    )
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    text = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
    assert text.strip(), "the adapted model generated nothing"
