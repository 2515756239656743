"""edgefed-agent commands: user errors end in one line and exit 2; run, profile, model, keygen."""

import json
import os
import stat
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from click.testing import CliRunner

import edge_agent.cli
import edge_agent.methods
from edge_agent.cli import main
from edge_agent.errors import ModelError
from protocol.errors import ErrorCode
from protocol.frames import decode, encode
from protocol.messages import ErrorReply

ROOT = Path(__file__).resolve().parents[2]
SHA = "c3" * 32
PROFILE = {
    "hostname": "edge-host",
    "os": "Linux",
    "python": "3.11",
    "torch": "2.13",
    "cpus": 2,
    "ram_total": 8 << 30,
    "ram_available": 6 << 30,
    "disk_free": 10 << 30,
    "gpus": [],
    "matmul_gflops_fp32": 12.5,
    "matmul_gflops_bf16": 3.0,
}


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    # The daemon's logging setup would point the root logger at CliRunner's closed streams.
    monkeypatch.setattr(edge_agent.cli, "_setup_logging", lambda verbose, log_format="text": None)
    for name in [k for k in os.environ if k.startswith("EDGEFED_AGENT")]:
        monkeypatch.delenv(name)
    return CliRunner()


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Fake model store and profile modules (the real ones load models and time matmuls)."""
    calls: dict[str, Any] = {}

    def resolve_model(spec: str, cache_dir: Path | None = None, progress: bool = False) -> Any:
        calls["resolve"] = (spec, cache_dir)
        if spec == "unreachable":
            raise ModelError(f"model {spec!r} not found in the cache or on disk")
        return types.SimpleNamespace(name=spec, path=Path("/models") / spec, sha256=SHA)

    def collect_profile(measure: bool = True, disk_path: Path | None = None) -> dict[str, Any]:
        calls["profile"] = (measure, disk_path)
        return dict(PROFILE)

    store = types.ModuleType("edge_agent.model.store")
    store.resolve_model = resolve_model  # type: ignore[attr-defined]
    profile = types.ModuleType("edge_agent.daemon.profile")
    profile.collect_profile = collect_profile  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "edge_agent.model.store", store)
    monkeypatch.setitem(sys.modules, "edge_agent.daemon.profile", profile)
    monkeypatch.setattr(edge_agent.methods, "client_methods", lambda: {"fedit": object})
    return calls


def agent_toml(tmp_path: Path, body: str = "", data: str = '{"text": "hello"}\n') -> Path:
    (tmp_path / "train.jsonl").write_text(data)
    path = tmp_path / "agent.toml"
    path.write_text(
        '[agent]\nid = "edge-9"\ndata = "train.jsonl"\naggregator = "tcp://127.0.0.1:9"\n'
        + body
        + "\n[security]\ninsecure = true\n"
    )
    return path


def test_config_check_ok_and_every_error_listed(runner: CliRunner, tmp_path: Path) -> None:
    good = agent_toml(tmp_path)
    result = runner.invoke(main, ["config", "check", "--config", str(good)])
    assert (result.exit_code, result.output) == (0, "ok\n")

    bad = tmp_path / "bad.toml"
    bad.write_text('[agent]\nid = "a b"\nliveness = -1\nwho = 1\n')
    result = runner.invoke(main, ["config", "check", "--config", str(bad)])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert [line.split(": ")[2] for line in lines] == [
        "agent.id",
        "agent.data",
        "agent.liveness",
        "agent.who",
        "security.secret_key",
        "security.server_public_key",
    ]
    assert all(line.startswith(f"edgefed-agent: {bad}: ") for line in lines)
    assert "Traceback" not in result.output


def test_run_with_a_bad_data_line_exits_2_with_file_and_line(
    runner: CliRunner, tmp_path: Path, fakes: dict[str, Any]
) -> None:
    config = agent_toml(tmp_path, data='{"text": "ok"}\n{"text": "ok"}\n{"txt": 1}\n')
    result = runner.invoke(main, ["run", "--config", str(config)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"edgefed-agent: {tmp_path / 'train.jsonl'}:3: ")
    assert len(result.stderr.splitlines()) == 1
    assert "resolve" not in fakes  # the data is checked before the model is touched


def test_run_with_missing_data_or_unreachable_model_exits_2(
    runner: CliRunner, tmp_path: Path, fakes: dict[str, Any]
) -> None:
    config = agent_toml(tmp_path, body='model = "unreachable"\n')
    result = runner.invoke(main, ["run", "--config", str(config)])
    assert result.exit_code == 2
    assert result.stderr == "edgefed-agent: model 'unreachable' not found in the cache or on disk\n"

    (tmp_path / "train.jsonl").unlink()
    result = runner.invoke(main, ["run", "--config", str(config)])
    assert result.exit_code == 2
    assert result.stderr == (
        f"edgefed-agent: {config}: agent.data: missing file: {tmp_path / 'train.jsonl'}\n"
    )


def test_run_refused_by_the_aggregator_exits_2_and_env_overrides_the_endpoint(
    runner: CliRunner, tmp_path: Path, fakes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = agent_toml(tmp_path)
    router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    seen: list[Any] = []

    def refuse() -> None:
        if router.poll(10_000):
            identity, *frames = router.recv_multipart()
            seen.append((identity, decode(frames).header))
            reply = ErrorReply(code=ErrorCode.VERSION_MISMATCH, reason="aggregator speaks [9]")
            router.send_multipart([identity, *encode(reply)])

    thread = threading.Thread(target=refuse)
    thread.start()
    monkeypatch.setenv("EDGEFED_AGENT_AGGREGATOR", f"tcp://127.0.0.1:{port}")
    try:
        result = runner.invoke(main, ["run", "--config", str(config)])
    finally:
        thread.join(15)
        router.close()
    assert result.exit_code == 2, result.output
    identity, hello = seen[0]
    assert identity == b"edge-9"
    assert (hello.type, hello.agent_id, hello.models) == ("hello", "edge-9", [SHA])
    assert hello.profile.matmul_gflops_fp32 == 12.5
    assert fakes["profile"] == (True, tmp_path / "state")
    assert (tmp_path / "state" / "outbox").is_dir()


def test_run_and_check_with_unusable_curve_keys_exit_2(
    runner: CliRunner, tmp_path: Path, fakes: dict[str, Any]
) -> None:
    config = agent_toml(tmp_path)
    public, _ = zmq.auth.create_certificates(tmp_path, "server")
    garbage, short = tmp_path / "garbage", tmp_path / "short.key_secret"
    garbage.write_text("not a key\n")
    short.write_text('curve\n    public-key = "abc"\n    secret-key = "def"\n')
    secure = config.read_text().replace(
        "insecure = true", f'secret_key = "garbage"\nserver_public_key = "{public}"'
    )
    for command in (["run"], ["config", "check"]):
        config.write_text(secure)
        result = runner.invoke(main, [*command, "--config", str(config)])
        assert result.exit_code == 2
        assert result.stderr == (
            f"edgefed-agent: {config}: security.secret_key: not a CURVE key file "
            f"(No public key found in {garbage}): {garbage}\n"
        )
        config.write_text(secure.replace('"garbage"', f'"{public}"'))  # a public key, no secret
        result = runner.invoke(main, [*command, "--config", str(config)])
        assert result.exit_code == 2
        assert result.stderr == (
            f"edgefed-agent: {config}: security.secret_key: holds no secret key "
            f"(a .key_secret file is needed): {public}\n"
        )
        # a malformed secret and a server key that cannot be read: both, in one pass
        config.write_text(
            secure.replace('"garbage"', f'"{short}"').replace(str(public), str(tmp_path))
        )
        result = runner.invoke(main, [*command, "--config", str(config)])
        assert result.exit_code == 2
        assert result.stderr.splitlines() == [
            f"edgefed-agent: {config}: security.secret_key: malformed public key "
            f"(not 40 Z85 characters): {short}",
            f"edgefed-agent: {config}: security.server_public_key: not a file: {tmp_path}",
        ]
    assert "resolve" not in fakes  # keys are checked before the slow steps


def test_profile_prints_json(runner: CliRunner, fakes: dict[str, Any]) -> None:
    result = runner.invoke(main, ["profile", "--no-measure"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == PROFILE
    assert fakes["profile"] == (False, None)


def test_model_prepare_prints_name_path_sha(
    runner: CliRunner, tmp_path: Path, fakes: dict[str, Any]
) -> None:
    result = runner.invoke(main, ["model", "prepare", "--model", "tiny", "--cache", str(tmp_path)])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"name": "tiny", "path": "/models/tiny", "sha256": SHA}
    assert fakes["resolve"] == ("tiny", tmp_path)
    result = runner.invoke(main, ["model", "prepare", "--model", "unreachable"])
    assert result.exit_code == 2
    assert result.stderr.startswith("edgefed-agent: model 'unreachable' not found")


def test_keygen_writes_a_private_secret_and_refuses_to_overwrite(
    runner: CliRunner, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    result = runner.invoke(main, ["keygen", "--dir", str(keys), "--name", "edge-9"])
    assert result.exit_code == 0
    public, secret = keys / "edge-9.key", keys / "edge-9.key_secret"
    assert result.stdout == f"public key: {public}\nsecret key: {secret}\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    public_key, secret_key = zmq.auth.load_certificate(secret)
    assert zmq.auth.load_certificate(public) == (public_key, None)
    assert len(public_key) == 40 and secret_key is not None and len(secret_key) == 40
    again = runner.invoke(main, ["keygen", "--dir", str(keys), "--name", "edge-9"])
    assert again.exit_code == 2 and "exists; not overwriting" in again.stderr
    assert zmq.auth.load_certificate(secret)[1] == secret_key


def test_keygen_creates_a_missing_directory_0700(runner: CliRunner, tmp_path: Path) -> None:
    keys = tmp_path / "etc" / "keys"  # neither exists yet
    old = os.umask(0o022)  # a common umask: it must not widen what keygen asks for
    try:
        result = runner.invoke(main, ["keygen", "--dir", str(keys), "--name", "edge-9"])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys / "edge-9.key_secret").stat().st_mode) == 0o600


def test_module_entry_point_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text("[agent]\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", "config", "check", "--config", "agent.toml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "agent.toml: agent.id: required field is missing" in proc.stderr


def _private(root: Path) -> list[str]:
    """Paths under ``root`` (and itself) that its group or others can read, write or enter."""
    return [str(p) for p in [root, *root.rglob("*")] if stat.S_IMODE(p.stat().st_mode) & 0o077]


def test_run_creates_its_state_private_whatever_the_umask(
    runner: CliRunner, tmp_path: Path, fakes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = agent_toml(tmp_path)
    router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def refuse() -> None:  # the daemon ends (exit 2) after it has made its state
        if router.poll(10_000):
            identity, *_ = router.recv_multipart()
            reply = ErrorReply(code=ErrorCode.VERSION_MISMATCH, reason="aggregator speaks [9]")
            router.send_multipart([identity, *encode(reply)])

    thread = threading.Thread(target=refuse)
    thread.start()
    old = os.umask(0o022)  # a usual login umask: the agent must not depend on it
    try:
        result = runner.invoke(
            main, ["run", "--config", str(config), "--aggregator", f"tcp://127.0.0.1:{port}"]
        )
        assert os.umask(0o022) == 0o022  # restored after the command
    finally:
        os.umask(old)
        thread.join(15)
        router.close()
    assert result.exit_code == 2, result.output
    state = tmp_path / "state"
    assert (state / "outbox").is_dir() and len(list(state.rglob("*"))) >= 2
    assert _private(state) == []


def test_the_log_names_the_agent_its_data_and_its_own_file(tmp_path: Path) -> None:
    config = agent_toml(tmp_path, body='model = "unreachable"\n')  # ends at the model step
    log = tmp_path / "logs" / "edge-9.log"
    log.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:  # what local does with each agent's output
        proc = subprocess.run(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env=env, timeout=120, check=False,
        )  # fmt: skip
    assert proc.returncode == 2
    text = log.read_text()
    assert (
        f"agent edge-9 starting: data {tmp_path / 'train.jsonl'}, state {tmp_path / 'state'}, "
        f"model unreachable, log {log}"
    ) in text
    # to a pipe (the journal, a terminal) the line names no file
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert "agent edge-9 starting: data" in proc.stderr and ", log " not in proc.stderr
