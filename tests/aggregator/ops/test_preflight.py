"""``config check`` and ``serve`` report every problem in one pass and create nothing first."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from aggregator.cli import main

SHA = "ef" * 32


def write(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "aggregator.toml"
    cfg.write_text(text, encoding="utf-8")
    return cfg


BROKEN = f"""
[server]
state_dir = "state"
hearbeat_interval = 1
[security]
secret_key = "keys/aggregator.key_secret"
allow_dir = "allowed"
[run]
model_sha256 = "{SHA}"
public_data = "public.jsonl"
[method.train]
lr = -1
[method.lora]
r = 0
"""


def test_one_pass_reports_fields_method_and_files(tmp_path: Path) -> None:
    cfg = write(tmp_path, BROKEN)
    result = CliRunner().invoke(main, ["config", "check", "--config", str(cfg)])
    assert result.exit_code == 2
    text = result.output
    assert "server.hearbeat_interval" in text
    assert "train.lr" in text and "lora.r" in text
    assert f"security.secret_key: missing file: {tmp_path / 'keys/aggregator.key_secret'}" in text
    assert f"security.allow_dir: missing directory: {tmp_path / 'allowed'}" in text
    assert f"run.public_data: missing file: {tmp_path / 'public.jsonl'}" in text
    assert "Invalid certificate" not in text and "Traceback" not in text


def test_serve_with_a_missing_key_says_missing_and_creates_nothing(tmp_path: Path) -> None:
    (tmp_path / "allowed").mkdir()
    cfg = write(
        tmp_path,
        f'[server]\nstate_dir = "state"\n[security]\nsecret_key = "k.key_secret"\n'
        f'allow_dir = "allowed"\n[run]\nmodel_sha256 = "{SHA}"\n',
    )
    result = CliRunner().invoke(main, ["serve", "--config", str(cfg)])
    assert result.exit_code == 2
    assert f"security.secret_key: missing file: {tmp_path / 'k.key_secret'}" in result.output
    assert "Invalid certificate" not in result.output
    assert not (tmp_path / "state").exists()


def test_a_public_key_in_place_of_the_secret_is_named(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert CliRunner().invoke(main, ["keygen", "--dir", str(keys), "--name", "agg"]).exit_code == 0
    (tmp_path / "allowed").mkdir()
    cfg = write(
        tmp_path,
        f'[security]\nsecret_key = "keys/agg.key"\nallow_dir = "allowed"\n'
        f'[run]\nmodel_sha256 = "{SHA}"\n',
    )
    result = CliRunner().invoke(main, ["config", "check", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "security.secret_key: holds no secret key" in result.output
    good = write(
        tmp_path,
        f'[security]\nsecret_key = "keys/agg.key_secret"\nallow_dir = "allowed"\n'
        f'[run]\nmodel_sha256 = "{SHA}"\n',
    )
    result = CliRunner().invoke(main, ["config", "check", "--config", str(good)])
    assert result.exit_code == 0, result.output
