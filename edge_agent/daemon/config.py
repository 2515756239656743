"""The agent's configuration file (``agent.toml``): TOML (:mod:`tomllib`) checked by pydantic.

Example::

    [agent]
    id = "edge-1"                          # routing id on the wire; letters, digits, . _ : @ -
    aggregator = "tcp://10.0.0.5:5555"
    state_dir = "/var/lib/edgefed-agent"   # the outbox lives in state_dir/outbox
    model = "smollm2-135m"                 # alias, Hugging Face directory or .gguf file
    data = "/srv/private/train.jsonl"
    # eval_data = "/srv/private/eval.jsonl"  (else a held-out split of data)
    holdout_fraction = 0.1
    heartbeat_interval = 1.0               # until the aggregator's Welcome says otherwise
    liveness = 3
    reconnect_min = 1.0
    reconnect_max = 32.0
    # metrics_port = 9101                  # Prometheus endpoint (off unless set)

    [security]
    secret_key = "keys/edge-1.key_secret"  # this agent's CURVE secret key (edgefed-agent keygen)
    server_public_key = "keys/aggregator.key"
    # insecure = true                      # plain TCP: only for tests on one machine

Relative paths resolve against the directory of the configuration file. Every problem (TOML
syntax aside, which stops parsing) is collected and reported at once in one :class:`ConfigError`,
one ``<file>: <field>: <problem>`` line each. ``overrides`` (CLI flags and ``EDGEFED_AGENT_*``
environment variables, see :mod:`edge_agent.cli`) replace file values before validation.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.errors import ConfigError
from protocol.cli_common import key_file_problems

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_AGGREGATOR = "tcp://127.0.0.1:5555"
DEFAULT_STATE_DIR = "state"
"""Relative to the configuration file, like every relative path in it."""

AgentId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:@-]+$")]
Endpoint = Annotated[str, Field(pattern=r"^(tcp|ipc)://\S+$", max_length=512)]
Seconds = Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentSection(_Section):
    id: AgentId
    aggregator: Endpoint = DEFAULT_AGGREGATOR
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    model: Annotated[str, Field(min_length=1, max_length=4096)] = DEFAULT_MODEL
    model_cache: Path | None = None
    data: Path
    eval_data: Path | None = None
    holdout_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    threads: Annotated[int, Field(ge=1, le=4096)] | None = None
    heartbeat_interval: Seconds = 1.0
    liveness: Annotated[int, Field(ge=1, le=100)] = 3
    reconnect_min: Seconds = 1.0
    reconnect_max: Seconds = 32.0
    progress: bool = False
    memory_limit: Annotated[int, Field(ge=1)] | None = None
    """Simulate a smaller machine: the profile reports at most this much RAM and, per GPU, this
    much GPU memory (bytes)."""
    bandwidth_limit_mbps: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Simulate a slower link: report at most this upload rate and delay each task's download
    and upload by its size at this rate."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    """Serve Prometheus metrics on this port (:mod:`edge_agent.daemon.metrics`; 0: any free
    port, logged); unset: no endpoint."""
    metrics_host: Annotated[str, Field(min_length=1, max_length=255)] = "127.0.0.1"
    """Address the metrics endpoint listens on (``0.0.0.0`` for a scraper on another host)."""


class SecuritySection(_Section):
    insecure: bool = False
    secret_key: Path | None = None
    server_public_key: Path | None = None


class AgentConfig(_Section):
    """The whole file. ``path`` is where it was read from (for messages)."""

    agent: AgentSection
    security: SecuritySection = SecuritySection()
    path: Path = Path("agent.toml")

    @property
    def outbox_dir(self) -> Path:
        return self.agent.state_dir / "outbox"


_PATH_FIELDS = {
    "agent": ("state_dir", "model_cache", "data", "eval_data"),
    "security": ("secret_key", "server_public_key"),
}


def load_config(
    path: Path,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    check_files: bool = True,
) -> AgentConfig:
    """Read, override, validate and resolve ``path``; :class:`ConfigError` lists all problems.

    ``overrides`` maps a table name to field values, e.g. ``{"agent": {"aggregator": url}}``;
    ``None`` values are skipped. With ``check_files`` the data file, the evaluation file and (unless
    insecure) both key files must exist, and the key files must hold CURVE keys (the secret
    one a secret key).
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_config(raw, path, overrides, check_files=check_files)


def parse_config(
    raw: Mapping[str, Any],
    path: Path,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    check_files: bool = True,
) -> AgentConfig:
    """Validate an already parsed TOML document; see :func:`load_config`."""
    data: dict[str, Any] = {
        key: dict(value) if isinstance(value, Mapping) else value for key, value in raw.items()
    }
    for table, values in (overrides or {}).items():
        section = data.get(table, {})
        section = dict(section) if isinstance(section, Mapping) else {}
        section.update({k: v for k, v in values.items() if v is not None})
        data[table] = section
    base = path.parent
    if isinstance(data.get("agent"), dict):
        data["agent"].setdefault("state_dir", DEFAULT_STATE_DIR)
    for table, fields in _PATH_FIELDS.items():
        section = data.get(table)
        if isinstance(section, dict):
            for name in fields:
                if isinstance(section.get(name), str | Path):
                    section[name] = str(_resolve(base, str(section[name])))
    agent = data.get("agent")
    if isinstance(agent, dict) and isinstance(agent.get("model"), str):
        agent["model"] = _resolve_model_spec(base, agent["model"])

    problems: list[str] = []
    config: AgentConfig | None = None
    try:
        config = AgentConfig.model_validate({**data, "path": path})
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "top"
            problems.append(f"{where}: {_problem(error)}")
    problems += _cross_checks(data)
    if check_files:
        problems += _file_checks(data)
    if problems:
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems))
    assert config is not None
    return config


def _resolve(base: Path, value: str) -> Path:
    candidate = Path(value).expanduser()
    return candidate if candidate.is_absolute() else (base / candidate).resolve()


def _resolve_model_spec(base: Path, spec: str) -> str:
    """An alias stays as is; anything that looks like a path resolves against the file's dir."""
    looks_like_path = "/" in spec or spec.startswith(("~", ".")) or spec.endswith(".gguf")
    if looks_like_path or (base / spec).exists():
        return str(_resolve(base, spec))
    return spec


def _problem(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "required field is missing"
    return str(error["msg"])


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _cross_checks(data: Mapping[str, Any]) -> list[str]:
    """Checks that involve several fields, run on raw values so they join the field errors."""
    problems: list[str] = []
    agent = data.get("agent")
    if isinstance(agent, Mapping):
        low = _number(agent.get("reconnect_min", 1.0))
        high = _number(agent.get("reconnect_max", 32.0))
        if low is not None and high is not None and high < low:
            problems.append(
                f"agent.reconnect_max: must be at least reconnect_min ({high:g} < {low:g})"
            )
    security = data.get("security", {})
    if isinstance(security, Mapping) and security.get("insecure", False) is not True:
        for name in ("secret_key", "server_public_key"):
            if security.get(name) is None:
                problems.append(
                    f"security.{name}: required unless insecure = true "
                    "(create keys with `edgefed-agent keygen`)"
                )
    return problems


def _file_checks(data: Mapping[str, Any]) -> list[str]:
    """Files named in the (already path-resolved) raw tables, checked even when other fields
    are wrong, so that one pass reports every problem."""
    problems: list[str] = []
    agent = data.get("agent")
    agent = agent if isinstance(agent, Mapping) else {}
    security = data.get("security", {})
    security = security if isinstance(security, Mapping) else {}
    files: list[tuple[str, Any]] = [
        ("agent.data", agent.get("data")),
        ("agent.eval_data", agent.get("eval_data")),
    ]
    for name, file in files:
        if isinstance(file, str | Path) and not Path(file).is_file():
            problems.append(f"{name}: missing file: {file}")
    if security.get("insecure", False) is not True:
        # read as the link will read them: missing, unreadable and malformed keys all show here
        for name, secret in (("secret_key", True), ("server_public_key", False)):
            file = security.get(name)
            if isinstance(file, str | Path):
                problems += key_file_problems(f"security.{name}", Path(file), secret=secret)
    state_dir = agent.get("state_dir")
    if (
        isinstance(state_dir, str | Path)
        and Path(state_dir).exists()
        and not Path(state_dir).is_dir()
    ):
        problems.append(f"agent.state_dir: not a directory: {state_dir}")
    return problems
