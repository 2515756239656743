"""agent.toml: defaults, relative paths, overrides, and every problem reported at once."""

from pathlib import Path

import pytest
import zmq.auth

from edge_agent.daemon.config import DEFAULT_MODEL, load_config, parse_config
from edge_agent.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "keys").mkdir()
    zmq.auth.create_certificates(tmp_path / "keys", "edge")  # the check reads the keys
    zmq.auth.create_certificates(tmp_path / "keys", "server")
    return tmp_path


def test_minimal_config_gets_defaults_and_paths_relative_to_the_file(files: Path) -> None:
    path = write(
        files,
        """
        [agent]
        id = "edge-1"
        data = "train.jsonl"

        [security]
        secret_key = "keys/edge.key_secret"
        server_public_key = "keys/server.key"
        """,
    )
    config = load_config(path)
    a = config.agent
    assert a.id == "edge-1"
    assert a.data == files / "train.jsonl"
    assert a.state_dir == files / "state"
    assert config.outbox_dir == files / "state" / "outbox"
    assert a.model == DEFAULT_MODEL
    assert a.aggregator == "tcp://127.0.0.1:5555"
    assert (a.holdout_fraction, a.heartbeat_interval, a.liveness) == (0.1, 1.0, 3)
    assert (a.reconnect_min, a.reconnect_max, a.progress, a.threads) == (1.0, 32.0, False, None)
    assert config.security.insecure is False
    assert config.security.secret_key == files / "keys" / "edge.key_secret"


def test_model_paths_resolve_but_aliases_stay(files: Path) -> None:
    base = '[agent]\nid = "e"\ndata = "train.jsonl"\n[security]\ninsecure = true\n'
    config = load_config(write(files, base.replace('id = "e"', 'id = "e"\nmodel = "m/x.gguf"')))
    assert config.agent.model == str(files / "m" / "x.gguf")
    config = load_config(write(files, base.replace('id = "e"', 'id = "e"\nmodel = "tiny-llama"')))
    assert config.agent.model == "tiny-llama"


def test_overrides_replace_file_values_and_none_is_skipped(files: Path) -> None:
    path = write(
        files,
        '[agent]\nid = "edge-1"\ndata = "train.jsonl"\naggregator = "tcp://a:1"\n'
        "[security]\ninsecure = false\n",
    )
    config = load_config(
        path,
        {"agent": {"aggregator": "tcp://b:2", "liveness": None}, "security": {"insecure": True}},
    )
    assert config.agent.aggregator == "tcp://b:2"
    assert config.agent.liveness == 3
    assert config.security.insecure is True


def test_every_problem_is_listed_in_one_error(files: Path) -> None:
    path = write(
        files,
        """
        [agent]
        id = "edge 1"
        aggregator = "http://x"
        data = "missing.jsonl"
        holdout_fraction = 1.5
        liveness = 0
        reconnect_min = 8.0
        reconnect_max = 2.0
        colour = "blue"

        [security]
        secret_key = "keys/nope.key_secret"

        [extra]
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines)
    fields = sorted(line.split(": ")[1] for line in lines)
    assert fields == [
        "agent.aggregator",
        "agent.colour",
        "agent.data",
        "agent.holdout_fraction",
        "agent.id",
        "agent.liveness",
        "agent.reconnect_max",
        "extra",
        "security.secret_key",
        "security.server_public_key",
    ]
    text = str(info.value)
    assert "agent.colour: unknown field" in text
    assert "extra: unknown field" in text
    assert "must be at least reconnect_min (2 < 8)" in text
    assert "security.server_public_key: required unless insecure = true" in text


def test_missing_files_are_reported_together(files: Path) -> None:
    path = write(
        files,
        '[agent]\nid = "edge-1"\ndata = "nope.jsonl"\neval_data = "eval.jsonl"\n'
        '[security]\nsecret_key = "keys/x"\nserver_public_key = "keys/server.key"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert lines == [
        f"{path}: agent.data: missing file: {files / 'nope.jsonl'}",
        f"{path}: agent.eval_data: missing file: {files / 'eval.jsonl'}",
        f"{path}: security.secret_key: missing file: {files / 'keys' / 'x'}",
    ]
    load_config(path, check_files=False)  # the same file is valid when files are not checked


def test_field_errors_do_not_hide_missing_files(files: Path) -> None:
    path = write(
        files,
        '[agent]\nid = "edge-1"\ndata = "nope.jsonl"\nliveness = 0\n[security]\ninsecure = true\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "agent.liveness:" in text
    assert f"agent.data: missing file: {files / 'nope.jsonl'}" in text


def test_missing_agent_table_and_required_fields(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent: required field is missing"):
        load_config(write(tmp_path, "[security]\ninsecure = true\n"))
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[agent]\n[security]\ninsecure = true\n"))
    assert "agent.id: required field is missing" in str(info.value)
    assert "agent.data: required field is missing" in str(info.value)


def test_toml_syntax_and_missing_file_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 2"):
        load_config(write(tmp_path, '[agent]\nid = "x\n'))
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "absent.toml")


def test_simulated_limits_cap_the_profile(tmp_path: Path) -> None:
    from edge_agent.daemon.handshake import agent_profile

    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    agent = {"id": "a", "data": str(data), "memory_limit": 123_456_789, "bandwidth_limit_mbps": 7.5}
    cfg = parse_config({"agent": agent, "security": {"insecure": True}}, tmp_path / "agent.toml")
    profile = agent_profile(cfg)
    assert profile.ram_total == 123_456_789 and profile.ram_available <= 123_456_789
    assert profile.bandwidth_mbps == 7.5


def test_simulated_memory_caps_the_gpus_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_agent.daemon import profile as profile_module
    from edge_agent.daemon.handshake import agent_profile

    real = profile_module.collect_profile

    def with_gpu(**kw: object) -> dict[str, object]:
        data = real(measure=False, disk_path=kw.get("disk_path"))  # type: ignore[arg-type]
        gpu = {"index": 0, "name": "big", "memory_total": 150 * 10**9, "memory_free": 140 * 10**9}
        return {**data, "gpus": [gpu]}

    monkeypatch.setattr(profile_module, "collect_profile", with_gpu)
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    agent = {"id": "a", "data": str(data), "memory_limit": 940_000_000}
    cfg = parse_config({"agent": agent, "security": {"insecure": True}}, tmp_path / "agent.toml")
    gpu = agent_profile(cfg).gpus[0]
    assert gpu.memory_total == 940_000_000 and gpu.memory_free == 940_000_000
