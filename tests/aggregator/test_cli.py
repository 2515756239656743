"""edgefed-aggregator's tools: config check, keygen, status and export on a real state dir."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from aggregator.cli import main
from aggregator.errors import ConfigError
from aggregator.ops.config import build_config

SHA = "ef" * 32


def test_config_check_reports_every_error_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "aggregator.toml"
    cfg.write_text(
        "[server]\nhearbeat_interval = 1\n[run]\nrounds = 0\nquant = 'fp8'\n[method.lora]\nr = 0\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["config", "check", "--config", str(cfg)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("edgefed-aggregator")]
    text = result.output
    assert "server.hearbeat_interval" in text and "run.rounds" in text and "run.quant" in text
    assert lines and "Traceback" not in text


def test_config_check_method_params_and_curve(tmp_path: Path) -> None:
    cfg = tmp_path / "aggregator.toml"
    cfg.write_text("[method.lora]\nr = 0\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["config", "check", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "lora.r" in result.output
    assert "CURVE is on by default" in result.output


def test_config_ok_and_paths_resolve_against_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "aggregator.toml"
    cfg.write_text('[server]\nstate_dir = "state"\n[security]\ninsecure = true\n', encoding="utf-8")
    result = CliRunner().invoke(main, ["config", "check", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "ok"


def test_missing_config_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["config", "check", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert result.output.strip().endswith("no such file")


def test_build_config_rejects_unknown_method() -> None:
    try:
        build_config({"run": {"method": "nope"}, "security": {"insecure": True}})
    except ConfigError as exc:
        assert "unknown method 'nope'" in str(exc)
    else:
        raise AssertionError("an unknown method was accepted")


def test_keygen_writes_secret_0600(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["keygen", "--dir", str(tmp_path), "--name", "agg"])
    assert result.exit_code == 0, result.output
    secret = tmp_path / "agg.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert (tmp_path / "agg.key").read_text().count("public-key") == 1


def test_keygen_creates_a_missing_directory_0700(tmp_path: Path) -> None:
    keys = tmp_path / "etc" / "keys"  # neither exists yet
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(main, ["keygen", "--dir", str(keys), "--name", "agg"])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys / "agg.key_secret").stat().st_mode) == 0o600


def test_status_and_export_on_a_finished_round(tmp_path: Path) -> None:
    # one committed round, made by the in-process engine harness
    from engine_harness import Harness, lora_state, start_round

    h = Harness(tmp_path)
    tasks = start_round(h, ["a1", "a2"])
    h.result(tasks["a1"], "a1", 10, lora_state(1.0))
    h.result(tasks["a2"], "a2", 30, lora_state(5.0))
    h.tick()
    h.close()
    result = CliRunner().invoke(main, ["status", "--state-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["run_id"] == "run-t"
    assert [a["agent_id"] for a in data["agents"]] == ["a1", "a2"]
    assert data["rounds"][0]["round"] == 1 and data["rounds"][0]["committed"] is True
    assert data["rounds"][0]["agents"] == 2.0
    assert data["state"]["checkpoint_round"] == "1"
    assert json.loads(data["state"]["params"])["lora"]["r"] == 4
    table = CliRunner().invoke(main, ["status", "--state-dir", str(tmp_path)])
    assert "run run-t  method fedit" in table.output
    assert "  checkpoint_round: 1" in table.output

    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", "--state-dir", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    expected = (10 * lora_state(1.0)[name] + 30 * lora_state(5.0)[name]) / 40
    torch.testing.assert_close(weights[name], expected, rtol=0, atol=1e-6)


def test_status_on_an_empty_dir_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["status", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no ledger here" in result.output


def test_export_merge_into_writes_base_plus_scaled_fedavg_delta(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`export --merge-into` from the command line, fedit: the merged q_proj is the base's plus
    (alpha / r) · B·A of the example-weighted mean adapter, every other weight untouched."""
    from engine_harness import Harness, start_round

    q = "model.layers.0.self_attn.q_proj"
    prefix = f"base_model.model.{q}"

    def state(v: float) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(int(v * 10))
        return {
            f"{prefix}.lora_A.weight": torch.randn(4, 64, generator=g) * v,
            f"{prefix}.lora_B.weight": torch.randn(64, 4, generator=g) * v,
        }

    h = Harness(tmp_path / "state")
    tasks = start_round(h, ["a1", "a2"])
    h.result(tasks["a1"], "a1", 10, state(1.0))
    h.result(tasks["a2"], "a2", 30, state(2.0))
    h.tick()
    h.close()
    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", "--state-dir", str(tmp_path / "state"),
                                       "--out", str(out), "--merge-into", str(tiny_model_dir)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"merged: {out / 'merged'}" in result.output

    a1, a2 = state(1.0), state(2.0)
    mean = {k: (10 * a1[k] + 30 * a2[k]) / 40 for k in a1}
    delta = 8.0 / 4 * mean[f"{prefix}.lora_B.weight"] @ mean[f"{prefix}.lora_A.weight"]
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    merged = {}
    for f in sorted((out / "merged").glob("*.safetensors")):
        merged.update(load_file(str(f)))
    assert merged.keys() == base.keys()
    torch.testing.assert_close(merged[f"{q}.weight"], base[f"{q}.weight"] + delta)
    assert not torch.equal(merged[f"{q}.weight"], base[f"{q}.weight"])
    for name in base:
        if name != f"{q}.weight":
            assert torch.equal(merged[name], base[name]), name
    # and it loads as a model with no adapter attached
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "merged")
    torch.testing.assert_close(model.state_dict()[f"{q}.weight"], base[f"{q}.weight"] + delta)


def test_serve_creates_its_state_private_whatever_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aggregator.engine import service as service_module
    from aggregator.store.ledger import Ledger

    class Service:  # what serve's service does first: make the state dir, open the ledger
        def __init__(self, config: Any, model: Any, **_: Any) -> None:
            self.state_dir = config.server.state_dir

        def run(self) -> int:
            Ledger(self.state_dir / "ledger.sqlite").close()
            (self.state_dir / "checkpoints").mkdir()
            (self.state_dir / "checkpoints" / "round-1.safetensors").write_bytes(b"x")
            return 0

    monkeypatch.setattr(service_module, "AggregatorService", Service)
    cfg = tmp_path / "aggregator.toml"
    cfg.write_text(
        f'[server]\nstate_dir = "state"\n[security]\ninsecure = true\n[run]\nmodel_sha256 = "{SHA}"\n',
        encoding="utf-8",
    )
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(main, ["serve", "--config", str(cfg)])
        assert os.umask(0o022) == 0o022  # restored after the command
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    state = tmp_path / "state"
    made = [state, *state.rglob("*")]
    assert {p.name for p in made} >= {"state", "ledger.sqlite", "round-1.safetensors"}
    assert [str(p) for p in made if stat.S_IMODE(p.stat().st_mode) & 0o077] == []
